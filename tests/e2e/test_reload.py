"""Operating the gateway: SIGHUP (log reopen, config reload: live keys
applied and logged, restart-only keys kept, a bad config refused whole),
--log-dir creation, --check-config, --version, and the generated documents
(example config, man pages, bash completion)."""

import http.client
import os
import re
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from tunnel_env import REPO, SANITIZED, Proc, wait_for

SCALE = 3 if SANITIZED else 1
T = 15 * SCALE  # bound on every wait below


def gw_bin(build_dir):
    return Path(build_dir) / "gateway/tunnel-gateway"


class LoggedGateway(Proc):
    """A cleartext gateway on 127.0.0.1:0 whose log goes to DIR/tunnel-gateway.log."""

    def __init__(self, build_dir, tmp, conf, *extra, log_dir=None):
        self.log_dir = Path(log_dir or Path(tmp) / "logs")
        self.logfile = self.log_dir / "tunnel-gateway.log"
        argv = [gw_bin(build_dir), "--config", conf, "--listen", "127.0.0.1:0", "--no-tls",
                "--state-dir", Path(tmp) / "state", "--log-dir", self.log_dir,
                "--summary-interval", "0", *extra]
        super().__init__(argv, Path(tmp) / "gateway.out")
        m = self.wait_file(r"event=listening addr=\S+ port=(\d+)")
        self.port = int(m.group(1))

    def file_text(self, path=None):
        p = Path(path or self.logfile)
        return p.read_text(errors="replace") if p.exists() else ""

    def wait_file(self, pattern, path=None, timeout=T):
        rx = re.compile(pattern)

        def find():
            if self.p.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.p.returncode}):\n{self.text()}"
                                   f"\n{self.file_text()[-3000:]}")
            return rx.search(self.file_text(path))
        return wait_for(find, timeout, f"/{pattern}/ in {path or self.logfile}")

    def count(self, pattern):
        return len(re.findall(pattern, self.file_text()))

    def hup_and_wait(self, pattern):
        """SIGHUP, then wait until pattern has one more match than before."""
        before = self.count(pattern)
        os.kill(self.p.pid, signal.SIGHUP)
        wait_for(lambda: self.count(pattern) > before, T, f"/{pattern}/ after SIGHUP")

    def get(self, header_bytes=0):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=T)
        headers = {"Host": "localhost"}
        if header_bytes:
            headers["X-Pad"] = "a" * header_bytes
        c.request("GET", "/health", headers=headers)
        r = c.getresponse()
        r.read()
        c.close()
        return r.status


@pytest.fixture
def gw_factory(build_dir, tmp_path):
    started = []

    def start(conf_text, *extra, **kw):
        conf = tmp_path / "gw.conf"
        conf.write_text(conf_text)
        g = LoggedGateway(build_dir, tmp_path, conf, *extra, **kw)
        g.conf = conf
        started.append(g)
        return g
    yield start
    for g in started:
        rc = g.stop()
        assert rc == 0, f"gateway exit {rc}:\n{g.text()}\n{g.file_text()[-2000:]}"


def test_log_dir_created_and_rotation_reopens(gw_factory, tmp_path):
    log_dir = tmp_path / "var" / "log" / "tg"   # two missing levels
    g = gw_factory("", log_dir=log_dir)
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o700
    assert g.get() == 200
    rotated = log_dir / "tunnel-gateway.log.1"
    os.rename(g.logfile, rotated)
    g.hup_and_wait(r"event=reloaded what=config")  # counted in the new file
    assert g.logfile.exists(), "no new file at the old path after SIGHUP"
    new = g.file_text()
    assert "event=reloaded what=config" in new
    old = rotated.read_text()
    assert "event=listening" in old and "what=config" not in old
    # later lines keep going to the new file
    before = len(rotated.read_text())
    os.kill(g.p.pid, signal.SIGHUP)
    g.wait_file(r"(?s)what=config.*what=config")
    assert len(rotated.read_text()) == before


def test_log_dir_impossible(build_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = subprocess.run([gw_bin(build_dir), "--listen", "127.0.0.1:0", "--no-tls",
                        "--state-dir", tmp_path / "s", "--log-dir", blocker / "logs"],
                       capture_output=True, text=True, timeout=T)
    assert p.returncode == 1
    assert f"--log-dir {blocker}/logs: cannot create the directory: Not a directory" in p.stderr


def test_limit_reload_applied_and_logged(gw_factory):
    g = gw_factory("max-header-bytes = 8192\n")
    assert g.get(4000) == 200
    assert g.get(9000) == 431
    g.conf.write_text("max-header-bytes = 2000\ndomain = \"other.test\"\nlog-level = \"warn\"\n")
    g.hup_and_wait(r"event=reloaded what=config")
    text = g.file_text()
    assert "event=config_changed key=max-header-bytes old=8192 new=2000" in text
    assert "event=config_changed key=log-level old=info new=warn" in text
    assert "event=config_needs_restart key=domain old=localhost new=other.test" in text
    assert "event=reloaded what=config changed=2 need_restart=1" in text
    assert g.get(4000) == 431          # the new limit is in force
    assert g.get() == 200              # and the domain is still localhost
    # trust-proxy and limits back; log level warn now hides info lines
    g.conf.write_text("max-header-bytes = 8192\ndomain = \"other.test\"\n"
                      "log-level = \"info\"\ntrust-proxy = \"10.0.0.0/8\"\n")
    g.hup_and_wait(r"event=reloaded what=config changed=3")
    text = g.file_text()
    assert re.search(r'event=config_changed key=trust-proxy old=(""|-)? new=10\.0\.0\.0/8\n', text)
    # domain still differs from the running one: reported again, still kept
    assert text.count("event=config_needs_restart key=domain") == 2
    assert g.get(4000) == 200


@pytest.mark.parametrize("broken, reason", [
    ("max-header-bytes = 2000\nmax-body-bytes = lots\n",
     r'gw\.conf:2: max-body-bytes: \\"lots\\" is not a whole number'),
    ("max-header-bytes = 2000\n[x\n", r"gw\.conf:2: malformed \[section\] header"),
    ("max-header-bytes = 2000\nresponse-header-timeout = 10\nmax-response-header-timeout = 5\n",
     r"--response-header-timeout 10 exceeds --max-response-header-timeout 5"),
])
def test_bad_config_refused_old_kept(gw_factory, broken, reason):
    g = gw_factory("max-header-bytes = 8192\n")
    assert g.get(4000) == 200
    g.conf.write_text(broken)
    g.hup_and_wait(r"event=config_reload_refused")
    text = g.file_text()
    assert re.search(r"event=config_reload_refused err=\"[^\n]*" + reason, text), text[-2000:]
    assert "config_changed" not in text
    assert g.get(4000) == 200          # 2000 (first line) was not half-applied
    assert g.get(9000) == 431          # the old limit is still enforced
    # a good file afterwards is taken
    g.conf.write_text("max-header-bytes = 2000\n")
    g.hup_and_wait(r"event=reloaded what=config")
    assert g.get(4000) == 431


def check_config(build_dir, *args, env=None):
    e = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_GATEWAY_")}
    e.pop("PORT", None)
    e.pop("HOST", None)
    e.update(env or {})
    return subprocess.run([gw_bin(build_dir), *args, "--check-config"], capture_output=True,
                          text=True, timeout=T, env=e)


def line_of(out, key):
    m = re.search(rf"^{re.escape(key)} = (.*?)\s+# (.*)$", out, re.M)
    assert m, f"{key} missing in:\n{out}"
    return m.group(1), m.group(2)


def test_check_config_sources_and_exit_codes(build_dir, tmp_path):
    conf = tmp_path / "gw.conf"
    conf.write_text("# comment\nregion = \"eu\"\nmax-body-bytes = 1000\n")
    p = check_config(build_dir, "--config", conf, "--max-body-bytes", "2000",
                     env={"TUNNEL_GATEWAY_PING_INTERVAL": "7", "PORT": "9443"})
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert line_of(out, "region") == ('"eu"', f"file {conf}:2")
    assert line_of(out, "max-body-bytes") == ("2000", "command line")
    assert line_of(out, "ping-interval") == ("7", "env TUNNEL_GATEWAY_PING_INTERVAL")
    assert line_of(out, "port") == ('"9443"', "env PORT")
    assert line_of(out, "listen")[0] == '"127.0.0.1:9443"'
    assert line_of(out, "domain") == ('"localhost"', "default")
    assert line_of(out, "max-header-bytes") == ("65536", "default")
    assert f'# config = "{conf}"' in out
    # every file key of the table is printed
    keys = re.findall(r"^# ([a-z][a-z0-9-]+) = ", (REPO / "deploy/tunnel-gateway.conf.example")
                      .read_text(), re.M)
    assert keys
    for k in keys:
        line_of(out, k)
    # the output is itself a config file that loads to the same values
    again = tmp_path / "again.conf"
    again.write_text(out)
    p2 = check_config(build_dir, "--config", again)
    assert p2.returncode == 0, p2.stderr
    assert line_of(p2.stdout, "max-body-bytes") == ("2000", f"file {again}:{out.splitlines().index(next(l for l in out.splitlines() if l.startswith('max-body-bytes'))) + 1}")

    bad = tmp_path / "bad.conf"
    bad.write_text("max-body-bytes = -1\n")
    p = check_config(build_dir, "--config", bad)
    assert p.returncode == 2
    assert p.stdout == ""
    assert f"{bad}:1: max-body-bytes: \"-1\" is negative" in p.stderr
    p = check_config(build_dir, "--listen", "0.0.0.0:1")
    assert p.returncode == 2 and "neither --allow nor --open" in p.stderr


def test_example_config_is_generated_and_loads(build_dir):
    gen = subprocess.run([Path(build_dir) / "docs/man/gw_docgen", "conf"], capture_output=True,
                         text=True, timeout=T, check=True).stdout
    example = REPO / "deploy/tunnel-gateway.conf.example"
    assert example.read_text() == gen, \
        "deploy/tunnel-gateway.conf.example is stale: regenerate with gw_docgen conf"
    help_text = subprocess.run([gw_bin(build_dir), "--help"], capture_output=True, text=True,
                               timeout=T, check=True).stdout
    flags = set(re.findall(r"^  --([a-z0-9-]+)", help_text, re.M))
    keys = set(re.findall(r"^# ([a-z][a-z0-9-]+) = ", gen, re.M))
    not_in_file = {"config", "help", "version", "check-config"}
    assert keys == flags - not_in_file
    p = check_config(build_dir, "--config", example)
    assert p.returncode == 0, p.stderr


def test_man_pages_render(build_dir):
    help_text = subprocess.run([gw_bin(build_dir), "--help"], capture_output=True, text=True,
                               timeout=T, check=True).stdout
    flags = re.findall(r"^  --([a-z0-9-]+)", help_text, re.M)
    for page, must in (("tunnel-gateway.1", ["--" + f for f in flags]),
                       ("tunnel-agent.1", ["new", "enable", "status", "run", "--gateway",
                                           "--home"])):
        path = Path(build_dir) / "docs/man" / page
        src = path.read_text()
        assert src.startswith(".\\\"") and "\n.TH " in src and "\n.SH NAME\n" in src
        assert "\n.SH SYNOPSIS\n" in src and "\n.SH EXIT STATUS\n" in src
        if shutil.which("groff") is None:
            continue
        r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-rLL=200n", str(path)],
                           capture_output=True, timeout=T)
        assert r.returncode == 0
        assert r.stderr == b"", r.stderr.decode()
        text = r.stdout.decode()
        text = re.sub(r".\x08", "", text).replace("\u2010", "-").replace("\u2212", "-")
        for m in must:
            assert m in text, f"{m} missing in the rendered {page}"
    gw_src = (Path(build_dir) / "docs/man/tunnel-gateway.1").read_text()
    assert "SIGHUP" in gw_src and "config_needs_restart" in gw_src


COMPLETE = r'''
source "$1"
shift
COMP_WORDS=("$@")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
"$FUNC"
printf '%s\n' "${COMPREPLY[@]}"
'''


def complete(file, func, *words):
    r = subprocess.run(["bash", "-c", COMPLETE, "complete", str(file), *words],
                       capture_output=True, text=True, timeout=T, env={**os.environ, "FUNC": func})
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_bash_completion(build_dir, tmp_path):
    gwc = REPO / "deploy/bash-completion/tunnel-gateway"
    agc = REPO / "deploy/bash-completion/tunnel-agent"
    for f in (gwc, agc):
        r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True, timeout=T)
        assert r.returncode == 0, r.stderr
    gen = subprocess.run([Path(build_dir) / "docs/man/gw_docgen", "completion"],
                         capture_output=True, text=True, timeout=T, check=True).stdout
    assert gwc.read_text() == gen, "deploy/bash-completion/tunnel-gateway is stale"

    assert complete(gwc, "_tunnel_gateway", "tunnel-gateway", "--check") == ["--check-config"]
    assert set(complete(gwc, "_tunnel_gateway", "tunnel-gateway", "--log-level", "")) == \
        {"debug", "info", "warn", "error"}
    (tmp_path / "dir1").mkdir()
    (tmp_path / "file1").write_text("")
    assert complete(gwc, "_tunnel_gateway", "tunnel-gateway", "--log-dir",
                    str(tmp_path) + "/") == [str(tmp_path / "dir1")]
    assert str(tmp_path / "file1") in complete(gwc, "_tunnel_gateway", "tunnel-gateway",
                                               "--cert", str(tmp_path / "fi"))

    agent_help = subprocess.run([Path(build_dir) / "agent/tunnel-agent", "--help"],
                                capture_output=True, text=True, timeout=T, check=True).stdout
    cmds = re.findall(r"^  ([a-z]+)  +\S", agent_help.split("Commands:")[1].split("\n\n")[0],
                      re.M)
    assert cmds
    offered = complete(agc, "_tunnel_agent", "tunnel-agent", "")
    for c in cmds:
        assert c in offered, f"subcommand {c} is not completed"
    assert complete(agc, "_tunnel_agent", "tunnel-agent", "--home", "/tmp", "ena") == ["enable"]
    assert complete(agc, "_tunnel_agent", "tunnel-agent", "run", "--proto") == ["--protocol"]
    assert complete(agc, "_tunnel_agent", "tunnel-agent", "run", "--protocol", "o") == \
        ["osaurus"]
    assert complete(agc, "_tunnel_agent", "tunnel-agent", "status", "--j") == ["--json"]
    # every flag a command's help lists is completed for it
    for c in cmds:
        h = subprocess.run([Path(build_dir) / "agent/tunnel-agent", "help", c],
                           capture_output=True, text=True, timeout=T).stdout
        for flag in re.findall(r"^  (--[a-z-]+)", h, re.M):
            assert flag in complete(agc, "_tunnel_agent", "tunnel-agent", c, "--"), (c, flag)


def test_version_has_git_revision(build_dir):
    out = subprocess.run([gw_bin(build_dir), "--version"], capture_output=True, text=True,
                         timeout=T, check=True).stdout
    assert out.startswith("tunnel-gateway 0.")
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the version falls back to the project version")
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=7", "HEAD"],
                         capture_output=True, text=True, timeout=T, check=True).stdout.strip()
    assert re.search(r"\(git [^)]*" + rev[:7], out), out
