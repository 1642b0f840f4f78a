"""End-to-end tests of tunnel-agent's command line (everything but the daemon).

Runs the real binary from $TG_BUILD_DIR against a fresh --home per test.
Addresses and signatures are checked with tests/vectors/eip191_ref.py, an
independent implementation (python3-ecdsa + pycryptodome). Confirmation
prompts are answered on a real pseudo-terminal (pty module).
"""

import json
import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REF = REPO / "tests" / "vectors" / "eip191_ref.py"
ADDR_RE = re.compile(r"\b0x[0-9a-f]{40}\b")
SIG_RE = re.compile(r"\A0x[0-9a-f]{130}\n\Z")
PRIV = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318"
COMMANDS = ["new", "set", "list", "enable", "disable", "remove", "status", "sign", "run"]


# ---- helpers -------------------------------------------------------------


def ref(*args):
    """Runs the independent reference; returns (exit code, stdout stripped)."""
    p = subprocess.run(
        ["/usr/bin/python3", str(REF), *args], capture_output=True, text=True, timeout=60
    )
    return p.returncode, p.stdout.strip() + p.stderr.strip()


def ref_address(privhex):
    rc, out = ref("address", privhex)
    assert rc == 0, out
    return out


@pytest.fixture
def ta(run, home):
    """tunnel-agent --home <tmp> ARGS..."""

    def call(*args, **kw):
        return run("tunnel-agent", "--home", home, *args, **kw)

    return call


def agents_json(home):
    return json.loads((home / "agents.json").read_text())


def agent_entry(home, name):
    for a in agents_json(home)["agents"]:
        if a["name"] == name:
            return a
    return None


def new_agent(ta, name, target="http://127.0.0.1:8080", *extra):
    p = ta("new", name, "--target", target, *extra)
    assert p.returncode == 0, p.stderr
    m = ADDR_RE.findall(p.stdout)
    assert m, p.stdout
    return m[0], p


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _read_until_exit(fd, pid, answer, timeout):
    """Reads the child's terminal; types answer after the prompt appears."""
    out = b""
    answered = False
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"timed out; terminal so far: {out!r}")
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        out += chunk
        if not answered and b"Continue? [y/N]" in out:
            os.write(fd, answer.encode() + b"\n")
            answered = True
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace"), answered


def run_on_tty(argv, answer, timeout=20):
    """Runs argv with a pseudo-terminal as its controlling terminal (/dev/tty)."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    try:
        return _read_until_exit(fd, pid, answer, timeout)
    finally:
        os.close(fd)


def run_on_stdin_tty(argv, answer, timeout=20):
    """Runs argv with a terminal on stdin/stderr but no controlling terminal."""
    master, slave = os.openpty()
    p = subprocess.Popen(
        argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, close_fds=True
    )
    os.close(slave)
    try:
        return _read_until_exit(master, p.pid, answer, timeout)
    finally:
        os.close(master)
        p.returncode = 0  # reaped above


# ---- help, version, usage ------------------------------------------------


def test_help_mentions_every_command(run):
    p = run("tunnel-agent", "--help")
    assert p.returncode == 0
    for c in COMMANDS:
        assert re.search(rf"^\s+{c}\s", p.stdout, re.M), c
        assert f"tunnel-agent [--home DIR] {c}" in p.stdout, c
    assert "--home DIR" in p.stdout and "TUNNEL_AGENT_HOME" in p.stdout
    assert "https://" in p.stdout  # says whether https targets are forwarded
    for c in COMMANDS:
        a = run("tunnel-agent", "help", c)
        b = run("tunnel-agent", c, "--help")
        assert a.returncode == 0 and b.returncode == 0, c
        assert a.stdout == b.stdout
        assert a.stdout.startswith(f"Usage: tunnel-agent [--home DIR] {c}")
    assert "--key-file FILE" in run("tunnel-agent", "help", "new").stdout
    assert "--purge" in run("tunnel-agent", "help", "remove").stdout
    set_help = run("tunnel-agent", "help", "set").stdout
    for opt in ["--target", "--preserve-host", "--rewrite-host", "--max-inflight", "--id-header",
                "--response-timeout"]:
        assert opt in set_help


def test_version(run):
    p = run("tunnel-agent", "--version")
    assert p.returncode == 0
    # the project version, and the build's git revision inside a checkout
    m = re.fullmatch(r"tunnel-agent \d+\.\d+\.\d+(?: \(git (\S+)\))?\n", p.stdout)
    assert m, p.stdout
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        rev = subprocess.run(["git", "-C", str(repo), "describe", "--always"], capture_output=True,
                             text=True).stdout.strip()
        assert m.group(1) is not None and m.group(1).rstrip("+") == rev, (p.stdout, rev)


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["bogus"],
        ["--bogus", "list"],
        ["help", "bogus"],
        ["list", "extra"],
        ["list", "--bogus"],
        ["new", "a"],
        ["new", "--target", "http://127.0.0.1:1"],
        ["new", "bad name", "--target", "http://127.0.0.1:1"],
        ["new", "a", "--target", "ftp://x"],
        ["new", "a", "--target", "http://h:99999"],
        ["new", "a", "--target"],
        ["set", "a"],
        ["set", "a", "--max-inflight", "0"],
        ["set", "a", "--max-inflight", "100001"],
        ["set", "a", "--max-inflight", "-1"],
        ["set", "a", "--max-inflight", "ten"],
        ["set", "a", "--id-header", "X Bad"],
        ["set", "a", "--response-timeout", "-5"],
        ["set", "a", "--preserve-host", "--rewrite-host"],
        ["set", "a", "--preserve-host=yes"],
        ["enable"],
        ["sign", "a"],
        ["status", "--jsn"],
        ["run"],  # no gateway given or remembered
        ["run", "--gateway", "https://gw"],
        ["run", "--gateway", "wss://gw/other/path"],
        ["run", "--gateway", "wss://gw", "--protocol", "carrier-pigeon"],
        ["run", "--gateway", "wss://gw", "--log-level", "loud"],
        ["run", "--gateway", "wss://gw", "--log-format", "xml"],
        ["run", "--gateway", "wss://gw", "--ca-file", "/nonexistent/ca.pem"],
    ],
)
def test_usage_errors(ta, args, home):
    p = ta(*args)
    assert p.returncode == 2, (args, p.stdout, p.stderr)
    assert p.stderr.startswith("tunnel-agent: "), p.stderr
    assert p.stdout == ""
    assert not (home / "agents.json").exists()  # nothing was written


def test_usage_error_names_the_value(ta):
    p = ta("set", "a", "--max-inflight", "100001")
    assert "--max-inflight" in p.stderr and "100001" in p.stderr
    p = ta("new", "a", "--target", "ftp://x")
    assert "ftp://x" in p.stderr


# ---- new, keys, sign -----------------------------------------------------


def test_new_prints_address_that_matches_key_file(ta, home):
    addr, p = new_agent(ta, "web")
    assert "disabled" in p.stdout
    assert f"https://{addr}.<your gateway domain>" in p.stdout
    entry = agent_entry(home, "web")
    assert entry["address"] == addr
    assert entry["enabled"] is False
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                        entry["id"])
    assert entry["max_inflight"] == 64 and entry["id_header"] == "X-Agent-Id"
    assert entry["preserve_host"] is False and entry["response_timeout"] == 0
    key = home / "keys" / entry["key_file"]
    assert mode(key) == 0o600
    assert mode(home / "keys") == 0o700
    assert mode(home) == 0o700
    assert ref_address(key.read_text().strip()) == addr
    # A second agent gets another key.
    addr2, _ = new_agent(ta, "api")
    assert addr2 != addr


def test_new_url_uses_remembered_gateway(ta, home, agent_bin):
    # `run` remembers the gateway even when the daemon cannot start.
    r = run_daemon_briefly(agent_bin, home, "--gateway", "wss://gw.example.net",
                           gateway="wss://gw.example.net")
    assert agents_json(home)["gateway"] == "wss://gw.example.net", r
    addr, p = new_agent(ta, "web")
    assert f"https://{addr}.gw.example.net" in p.stdout


@pytest.mark.parametrize(
    "message",
    ["hello world", "héllo wörld ✓ 日本語", "line one\nline two\r\nline three\n", "", "-dash"],
    ids=["ascii", "utf8", "multiline", "empty", "dash"],
)
def test_sign_verifies_independently(ta, message):
    addr, _ = new_agent(ta, "signer")
    p = ta("sign", "signer", "--", message)
    assert p.returncode == 0, p.stderr
    assert SIG_RE.match(p.stdout), repr(p.stdout)
    sig = p.stdout.strip()
    rc, out = ref("verify", addr, message.encode().hex(), sig, "--hex")
    assert rc == 0 and out == "ok", out
    # And not for another message.
    rc, _ = ref("verify", addr, (message + "!").encode().hex(), sig, "--hex")
    assert rc == 1


def test_sign_matches_reference_for_imported_key(ta, tmp_path):
    kf = tmp_path / "k.hex"
    kf.write_text(PRIV + "\n")
    kf.chmod(0o600)
    new_agent(ta, "imp", "http://127.0.0.1:1", "--key-file", kf)
    p = ta("sign", "imp", "prove it")
    rc, want = ref("sign", PRIV, "prove it")
    assert rc == 0
    assert p.stdout == want + "\n"  # RFC 6979: both sides are deterministic


def test_sign_unknown_agent(ta):
    p = ta("sign", "nobody", "x")
    assert p.returncode == 1
    assert "nobody" in p.stderr


def test_new_key_file_import(ta, home, tmp_path):
    kf = tmp_path / "existing.key"
    kf.write_text("0x" + PRIV.upper() + "\n")
    kf.chmod(0o600)
    addr, p = new_agent(ta, "imported", "http://127.0.0.1:9000", "--key-file", kf)
    assert addr == ref_address(PRIV)
    entry = agent_entry(home, "imported")
    assert mode(home / "keys" / entry["key_file"]) == 0o600
    assert kf.read_text() == "0x" + PRIV.upper() + "\n"  # the user's file is left alone

    # The same key again, under another name: refused, nothing added.
    p = ta("new", "again", "--target", "http://127.0.0.1:9000", "--key-file", kf)
    assert p.returncode == 1
    assert addr in p.stderr and "imported" in p.stderr
    assert agent_entry(home, "again") is None
    assert sorted(os.listdir(home / "keys")) == [entry["key_file"]]


def test_new_key_file_group_readable_refused(ta, home, tmp_path):
    kf = tmp_path / "loose.key"
    kf.write_text(PRIV + "\n")
    kf.chmod(0o644)
    p = ta("new", "loose", "--target", "http://127.0.0.1:1", "--key-file", kf)
    assert p.returncode == 1
    assert str(kf) in p.stderr
    assert "chmod" in p.stderr  # says how to fix it
    assert p.stderr.startswith("tunnel-agent: ")
    assert not (home / "agents.json").exists() or agent_entry(home, "loose") is None


def test_new_key_file_missing_or_bad(ta, tmp_path):
    p = ta("new", "x", "--target", "http://127.0.0.1:1", "--key-file", tmp_path / "nope")
    assert p.returncode == 1 and "nope" in p.stderr
    bad = tmp_path / "bad.key"
    bad.write_text("not hex\n")
    bad.chmod(0o600)
    p = ta("new", "x", "--target", "http://127.0.0.1:1", "--key-file", bad)
    assert p.returncode == 1 and "bad.key" in p.stderr


def test_new_duplicate_name(ta, home):
    addr, _ = new_agent(ta, "dup")
    p = ta("new", "dup", "--target", "http://127.0.0.1:2")
    assert p.returncode == 1
    assert '"dup"' in p.stderr and "already exists" in p.stderr
    assert [a["address"] for a in agents_json(home)["agents"]] == [addr]


def test_https_target_recorded_with_warning(ta, home):
    addr, p = new_agent(ta, "tls", "https://127.0.0.1:8443")
    assert "warning" in p.stderr and "https" in p.stderr
    assert agent_entry(home, "tls")["target"] == "https://127.0.0.1:8443"


# ---- enable / disable ----------------------------------------------------


def test_enable_without_terminal_refused(ta, home):
    new_agent(ta, "web")
    p = ta("enable", "web")
    assert p.returncode == 2
    assert "--yes" in p.stderr
    assert agent_entry(home, "web")["enabled"] is False


def test_enable_yes_and_disable(ta, home):
    addr, _ = new_agent(ta, "web")
    p = ta("enable", "web", "--yes")
    assert p.returncode == 0, p.stderr
    assert "public internet" in p.stdout and addr in p.stdout
    assert agent_entry(home, "web")["enabled"] is True
    assert re.search(r"^web\s.*\byes\s*$", ta("list").stdout, re.M)
    p = ta("disable", "web")
    assert p.returncode == 0
    assert agent_entry(home, "web")["enabled"] is False
    assert re.search(r"^web\s.*\bno\s*$", ta("list").stdout, re.M)
    assert ta("disable", "nobody").returncode == 1
    assert ta("enable", "nobody", "--yes").returncode == 1


@pytest.mark.parametrize("runner", [run_on_tty, run_on_stdin_tty], ids=["dev_tty", "stdin_tty"])
def test_enable_asks_on_terminal(ta, home, bin_path, runner):
    new_agent(ta, "web", "http://127.0.0.1:7000")
    argv = [str(bin_path("tunnel-agent")), "--home", str(home), "enable", "web"]

    rc, screen, asked = runner(argv, "n")
    assert asked, screen
    assert "http://127.0.0.1:7000" in screen and "public internet" in screen
    assert rc == 2, screen
    assert agent_entry(home, "web")["enabled"] is False

    rc, screen, asked = runner(argv, "")  # just Enter: the default is No
    assert asked and rc == 2
    assert agent_entry(home, "web")["enabled"] is False

    rc, screen, asked = runner(argv, "y")
    assert asked, screen
    assert rc == 0, screen
    assert agent_entry(home, "web")["enabled"] is True


def test_piped_yes_is_not_a_confirmation(ta, home):
    new_agent(ta, "web")
    p = ta("enable", "web", input="y\n")
    assert p.returncode == 2
    assert agent_entry(home, "web")["enabled"] is False


# ---- set, list -----------------------------------------------------------


def test_set_changes_settings_and_keeps_key(ta, home):
    addr, _ = new_agent(ta, "web", "http://127.0.0.1:8080")
    key_before = (home / "keys" / agent_entry(home, "web")["key_file"]).read_bytes()
    p = ta("set", "web", "--target", "http://localhost:9090/api", "--preserve-host",
           "--max-inflight", "100000", "--id-header", "X-Caller", "--response-timeout", "120")
    assert p.returncode == 0, p.stderr
    e = agent_entry(home, "web")
    assert e["address"] == addr
    assert e["target"] == "http://localhost:9090/api"
    assert e["preserve_host"] is True
    assert e["max_inflight"] == 100000
    assert e["id_header"] == "X-Caller"
    assert e["response_timeout"] == 120
    assert (home / "keys" / e["key_file"]).read_bytes() == key_before
    p = ta("set", "web", "--rewrite-host", "--max-inflight=1")
    assert p.returncode == 0, p.stderr
    e = agent_entry(home, "web")
    assert e["preserve_host"] is False and e["max_inflight"] == 1
    assert e["target"] == "http://localhost:9090/api"  # untouched
    lst = ta("list").stdout
    assert re.search(rf"^web\s+{addr}\s+http://localhost:9090/api\s+no\s*$", lst, re.M), lst
    assert ta("set", "nobody", "--max-inflight", "3").returncode == 1


def test_list_table(ta):
    a1, _ = new_agent(ta, "one", "http://127.0.0.1:1")
    a2, _ = new_agent(ta, "two", "http://127.0.0.1:2/base")
    p = ta("list")
    assert p.returncode == 0
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ADDRESS", "TARGET", "ENABLED"]
    assert lines[1].split() == ["one", a1, "http://127.0.0.1:1", "no"]
    assert lines[2].split() == ["two", a2, "http://127.0.0.1:2/base", "no"]


def test_list_empty_home(ta):
    p = ta("list")
    assert p.returncode == 0
    assert p.stdout.split() == ["NAME", "ADDRESS", "TARGET", "ENABLED"]


# ---- remove --------------------------------------------------------------


def test_remove_keeps_key_under_removed(ta, home):
    addr, _ = new_agent(ta, "old")
    new_agent(ta, "stays")
    key = home / "keys" / agent_entry(home, "old")["key_file"]
    key_bytes = key.read_bytes()
    t0 = int(time.time())
    p = ta("remove", "old")
    assert p.returncode == 0, p.stderr
    assert agent_entry(home, "old") is None
    assert agent_entry(home, "stays") is not None
    assert not key.exists()
    moved = list((home / "removed").iterdir())
    assert len(moved) == 1
    m = re.fullmatch(r"old-(\d+)\.key", moved[0].name)
    assert m and t0 - 5 <= int(m.group(1)) <= time.time() + 5
    assert mode(moved[0]) == 0o600
    assert moved[0].read_bytes() == key_bytes
    assert str(moved[0]) in p.stdout
    # The kept key re-imports to the same address.
    addr2, _ = new_agent(ta, "back", "http://127.0.0.1:1", "--key-file", moved[0])
    assert addr2 == addr


def test_remove_purge_needs_confirmation(ta, home, bin_path):
    new_agent(ta, "victim")
    key = home / "keys" / agent_entry(home, "victim")["key_file"]
    p = ta("remove", "--purge", "victim")
    assert p.returncode == 2
    assert "--yes" in p.stderr
    assert agent_entry(home, "victim") is not None and key.exists()

    argv = [str(bin_path("tunnel-agent")), "--home", str(home), "remove", "--purge", "victim"]
    rc, screen, asked = run_on_tty(argv, "no")
    assert asked and rc == 2, screen
    assert agent_entry(home, "victim") is not None and key.exists()

    p = ta("remove", "--purge", "--yes", "victim")
    assert p.returncode == 0, p.stderr
    assert agent_entry(home, "victim") is None
    assert not key.exists()
    assert not (home / "removed").exists() or not list((home / "removed").iterdir())


def test_remove_unknown(ta):
    new_agent(ta, "x")
    p = ta("remove", "y")
    assert p.returncode == 1 and '"y"' in p.stderr


def test_concurrent_writers_lose_nothing(ta, home, agent_bin):
    """16 `new` at once: the lock on <home>/.lock serialises read-modify-write."""
    new_agent(ta, "first")  # home and agents.json exist before the race
    procs = [
        subprocess.Popen([str(agent_bin), "--home", str(home), "new", f"a{i}", "--target",
                          f"http://127.0.0.1:{1000 + i}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
        for i in range(16)
    ]
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    names = sorted(a["name"] for a in agents_json(home)["agents"])
    assert names == sorted(["first"] + [f"a{i}" for i in range(16)])
    assert len(os.listdir(home / "keys")) == 17
    leftovers = [n for n in os.listdir(home) if n.startswith(".agents.json")]
    assert leftovers == []


# ---- corrupt settings ----------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["list"], ["status"], ["status", "--json"], ["enable", "web", "--yes"], ["disable", "web"],
     ["new", "other", "--target", "http://127.0.0.1:1"], ["set", "web", "--max-inflight", "5"],
     ["remove", "web"], ["sign", "web", "m"]],
)
def test_truncated_agents_json(ta, home, args):
    new_agent(ta, "web")
    f = home / "agents.json"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])
    before = f.read_bytes()
    p = ta(*args)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert str(f) in p.stderr
    assert "invalid JSON near byte" in p.stderr
    assert f.read_bytes() == before
    assert sorted(os.listdir(home)) == [".lock", "agents.json", "keys"]


# ---- status, run ---------------------------------------------------------


def test_status_json_fields(ta):
    addr, _ = new_agent(ta, "web", "http://127.0.0.1:5000")
    ta("enable", "web", "--yes")
    p = ta("status", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["daemon"] is False
    [a] = doc["agents"]
    for k in ["name", "id", "address", "target", "enabled", "state", "url", "error"]:
        assert k in a, k
    assert a["name"] == "web" and a["address"] == addr
    assert a["target"] == "http://127.0.0.1:5000" and a["enabled"] is True
    assert a["state"] in ("connected", "connecting", "disconnected", "error")
    assert addr in a["url"]
    p = ta("status")
    assert p.returncode == 0 and "web" in p.stdout


def run_daemon_briefly(agent_bin, home, *args, gateway=None):
    """Starts `run ARGS`, waits until agents.json remembers gateway (the stub
    daemon exits at once; a real one keeps running and is stopped)."""
    argv = [str(agent_bin), "--home", str(home), "run", *map(str, args)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if agents_json(home).get("gateway") == gateway:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


@pytest.fixture
def agent_bin(bin_path):
    return bin_path("tunnel-agent")


def test_run_remembers_gateway(ta, home, tmp_path, agent_bin):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    rc, out, err = run_daemon_briefly(agent_bin, home, "--gateway", "ws://127.0.0.1:9/",
                                      "--ca-file", ca, "--protocol", "osaurus",
                                      gateway="ws://127.0.0.1:9/")
    doc = agents_json(home)
    assert doc["gateway"] == "ws://127.0.0.1:9/", (rc, err)
    assert doc["ca_file"] == str(ca.resolve())
    assert doc["protocol"] == "osaurus"
    assert doc["version"] == 1
    # Without options the remembered ones are used (and kept).
    run_daemon_briefly(agent_bin, home, gateway="ws://127.0.0.1:9/")
    doc = agents_json(home)
    assert doc["gateway"] == "ws://127.0.0.1:9/" and doc["protocol"] == "osaurus"
    # The last one given wins.
    run_daemon_briefly(agent_bin, home, "--gateway", "wss://gw2.example.org:8443", "--protocol",
                       "native", gateway="wss://gw2.example.org:8443")
    doc = agents_json(home)
    assert doc["gateway"] == "wss://gw2.example.org:8443" and doc["protocol"] == "native"
    addr, p = new_agent(ta, "web")
    assert f"https://{addr}.gw2.example.org:8443" in p.stdout


# ---- home directory ------------------------------------------------------


def test_home_from_environment(run, tmp_path):
    env_home = tmp_path / "from-env"
    p = run("tunnel-agent", "new", "e", "--target", "http://127.0.0.1:1",
            env={"TUNNEL_AGENT_HOME": str(env_home)})
    assert p.returncode == 0, p.stderr
    assert (env_home / "agents.json").exists()
    xdg = tmp_path / "xdg"
    p = run("tunnel-agent", "new", "x", "--target", "http://127.0.0.1:1",
            env={"TUNNEL_AGENT_HOME": "", "XDG_CONFIG_HOME": str(xdg)})
    assert p.returncode == 0, p.stderr
    assert (xdg / "tunnel-agent" / "agents.json").exists()
    assert mode(xdg / "tunnel-agent") == 0o700
    fake_home = tmp_path / "user"
    p = run("tunnel-agent", "list",
            env={"TUNNEL_AGENT_HOME": "", "XDG_CONFIG_HOME": "", "HOME": str(fake_home)})
    assert p.returncode == 0, p.stderr
    # --home wins over the environment, before or after the command.
    opt_home = tmp_path / "opt"
    p = run("tunnel-agent", "new", "o", "--target", "http://127.0.0.1:1", "--home", opt_home,
            env={"TUNNEL_AGENT_HOME": str(env_home)})
    assert p.returncode == 0, p.stderr
    assert (opt_home / "agents.json").exists()
    assert "o" not in [a["name"] for a in json.loads((env_home / "agents.json").read_text())
                       ["agents"]]
