"""The single-node deployment files in deploy/: the systemd units pass
`systemd-analyze verify` (and a broken copy does not), every option any
deploy file or deploy/README.md passes to the programs is accepted by the
built binaries, the Dockerfile's Debian packages exist and cover what the
binaries link, the certbot hook installs a lineage owner-only and reloads,
and a gateway started as the unit starts it serves the certificate the hook
installed, then the renewed one after the hook's reload.

No Docker engine, certbot or systemd (as PID 1) runs here: the image is
checked without being built, certbot's package names and plugin keys
without running it, and the units with systemd-analyze offline."""

import grp
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import warnings
from pathlib import Path

import pytest

from tunnel_env import REPO, Proc, wait_for

DEPLOY = REPO / "deploy"
UNITS = DEPLOY / "systemd"
HOOK = DEPLOY / "certbot" / "certbot-deploy-hook"
CONF = DEPLOY / "tunnel-gateway.conf"
DOCKERFILE = DEPLOY / "Dockerfile"
T = 15  # bound on every wait and subprocess below

# unit file -> (program, systemd-analyze --user?)
UNIT_FILES = {
    "tunnel-gateway.service": ("tunnel-gateway", False),
    "tunnel-agent.service": ("tunnel-agent", False),
    "user/tunnel-agent.service": ("tunnel-agent", True),
}
INSTALLED_BIN = "/usr/local/bin/"  # where the units in the tree run the programs from


# ---- helpers -------------------------------------------------------------------------

def need(tool, package):
    """The path of tool, or a failure naming the Debian package to install."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: apt-get install {package} "
                    "(scripts/install-deps.sh lists it)")
    return path


def sh(*argv, env=None, check=False, **kw):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=T,
                          env=env, check=check, stdin=subprocess.DEVNULL, **kw)


def clean_env(**extra):
    """os.environ without the variables the programs read, plus extra."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("TUNNEL_GATEWAY_", "TUNNEL_AGENT_")) and k not in ("PORT", "HOST")}
    e.update(extra)
    return e


def parse_unit(path):
    """{section: {key: [values in order]}} of a systemd unit file."""
    out, section, pending = {}, None, ""
    for raw in Path(path).read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        k, _, v = line.partition("=")
        out[section].setdefault(k.strip(), []).append(v.strip())
    return out


def one(unit, section, key):
    vals = unit.get(section, {}).get(key)
    assert vals, f"[{section}] {key}= missing"
    return vals[-1]


def exec_argv(value):
    """An Exec*= value as argv, without systemd's prefixes (-@:+!)."""
    return shlex.split(value.lstrip("-@:+!"))


def help_flags(text):
    return set(re.findall(r"^\s+(--[a-z0-9-]+)", text, re.M))


def gateway_help(bin_path):
    return sh(bin_path("tunnel-gateway"), "--help", check=True).stdout


def agent_commands(bin_path):
    text = sh(bin_path("tunnel-agent"), "--help", check=True).stdout
    block = text.split("Commands:")[1].split("\n\n")[0]
    return set(re.findall(r"^  ([a-z]+)  +\S", block, re.M))


def agent_flags(bin_path, command):
    r = sh(bin_path("tunnel-agent"), "help", command)
    assert r.returncode == 0, f"tunnel-agent help {command}: {r.stderr}"
    return help_flags(r.stdout) | {"--home", "--help"}


def check_config(bin_path, *args, env=None):
    return sh(bin_path("tunnel-gateway"), *args, "--check-config", env=clean_env(**(env or {})))


def effective(out, key):
    """(value, source) of key in --check-config output."""
    m = re.search(rf"^{re.escape(key)} = (.*?)\s+# (.*)$", out, re.M)
    assert m, f"{key} missing in --check-config output"
    return m.group(1), m.group(2)


def unit_copy(tmp_path, rel, bin_path):
    """A copy of deploy/systemd/REL whose ExecStart= runs the built program
    (verify needs the binary to exist)."""
    prog, _ = UNIT_FILES[rel]
    text = (UNITS / rel).read_text()
    assert INSTALLED_BIN + prog in text
    dst = tmp_path / "units" / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text.replace(INSTALLED_BIN + prog, str(bin_path(prog))))
    return dst


def verify(unit_path, user, build_dir, tmp_path):
    """systemd-analyze verify: (ok, output). verify exits 0 on an unknown key
    or an unparsable value ("..., ignoring"), so any output at all fails."""
    exe = need("systemd-analyze", "systemd")
    man = tmp_path / "man" / "man1"  # Documentation=man:... must resolve
    man.mkdir(parents=True, exist_ok=True)
    for page in ("tunnel-gateway.1", "tunnel-agent.1"):
        src = Path(build_dir) / "docs/man" / page
        assert src.is_file(), f"{src} not built"
        if not (man / page).exists():
            (man / page).symlink_to(src)
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, MANPATH=str(man.parent), XDG_RUNTIME_DIR=str(runtime))
    argv = [exe, *(["--user"] if user else []), "verify", str(unit_path)]
    r = sh(*argv, env=env)
    out = (r.stdout + r.stderr).strip()
    return r.returncode == 0 and out == "", f"rc={r.returncode}\n{out}"


# ---- systemd units ---------------------------------------------------------------------

@pytest.mark.parametrize("rel", list(UNIT_FILES))
def test_unit_verifies(rel, bin_path, build_dir, tmp_path):
    """Each unit passes systemd-analyze verify without a single warning."""
    ok, out = verify(unit_copy(tmp_path, rel, bin_path), UNIT_FILES[rel][1], build_dir, tmp_path)
    assert ok, f"systemd-analyze verify deploy/systemd/{rel}:\n{out}"


@pytest.mark.parametrize("breakage", [
    (r"^ProtectSystem=strict$", "ProtectSystem=very"),       # unparsable value
    (r"^NoNewPrivileges=yes$", "NoNewPrivilege=yes"),         # unknown key
    (r"^\[Service\]$", "[Servise]"),                          # unknown section
    (r"^ExecStart=\S+", "ExecStart=/nonexistent/tunnel-gateway"),  # no such binary
    (r"^SystemCallFilter=@system-service$", "SystemCallFilter=@no-such-group"),
])
def test_verify_catches_a_broken_unit(breakage, bin_path, build_dir, tmp_path):
    """The check above fails on a broken copy of the gateway unit, so a pass means something."""
    good = unit_copy(tmp_path, "tunnel-gateway.service", bin_path)
    old, new = breakage
    text, n = re.subn(old, new, good.read_text(), count=1, flags=re.M)
    assert n == 1, old
    bad = tmp_path / "broken" / "tunnel-gateway.service"
    bad.parent.mkdir()
    bad.write_text(text)
    ok, out = verify(bad, False, build_dir, tmp_path)
    assert not ok, f"verify passed a unit with {new!r}"


@pytest.mark.parametrize("rel", ["tunnel-gateway.service", "tunnel-agent.service"])
def test_system_unit_exposure(rel, bin_path, build_dir, tmp_path):
    """systemd-analyze security rates each system unit 2.0 or better ("OK"):
    its sandboxing cannot silently erode."""
    exe = need("systemd-analyze", "systemd")
    unit = unit_copy(tmp_path, rel, bin_path)
    verify(unit, False, build_dir, tmp_path)  # sets up MANPATH's pages
    r = sh(exe, "security", "--offline=yes", "--threshold=20", unit,
           env=dict(os.environ, MANPATH=str(tmp_path / "man")))
    assert r.returncode == 0, f"exposure above 2.0:\n{r.stdout[-1500:]}{r.stderr}"


def test_gateway_unit_settings(bin_path):
    """The gateway unit: a dedicated user (created by its sysusers entry),
    --config from its ConfigurationDirectory, state in its StateDirectory,
    port 443 by one ambient capability, the hardening, reload by SIGHUP, and
    a stop timeout just above the configured drain-timeout."""
    u = parse_unit(UNITS / "tunnel-gateway.service")
    s = u["Service"]
    argv = exec_argv(one(u, "Service", "ExecStart"))
    assert argv[0] == INSTALLED_BIN + "tunnel-gateway"
    assert argv[1:] == ["--config", "/etc/tunnel-gateway/tunnel-gateway.conf"]
    assert one(u, "Service", "ConfigurationDirectory") == "tunnel-gateway"
    assert one(u, "Service", "StateDirectory") == "tunnel-gateway"
    sysusers = (UNITS / "tunnel-gateway.sysusers").read_text()
    assert re.search(r"^u\s+tunnel-gateway\s", sysusers, re.M)
    assert one(u, "Service", "User") == "tunnel-gateway"
    assert "DynamicUser" not in s
    for key, want in {"ProtectSystem": "strict", "NoNewPrivileges": "yes",
                      "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
                      "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
                      "PrivateTmp": "yes", "ProtectHome": "yes", "KillSignal": "SIGTERM",
                      "Restart": "on-failure",
                      "ExecReload": "/bin/kill -HUP $MAINPID"}.items():
        assert one(u, "Service", key) == want, key
    assert "@system-service" in s["SystemCallFilter"]
    assert set(one(u, "Service", "RestrictAddressFamilies").split()) == \
        {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert int(one(u, "Service", "LimitNOFILE")) >= 65536
    # a configuration error (exit 2) is not restarted
    r = check_config(bin_path, "--max-body-bytes", "lots")
    assert r.returncode == 2
    assert "2" in one(u, "Service", "RestartPreventExitStatus").split()

    out = check_config(bin_path, "--config", CONF).stdout
    assert effective(out, "state-dir")[0] == '"/var/lib/tunnel-gateway"'
    drain = int(effective(out, "drain-timeout")[0])
    assert drain == 600, "the default drain-timeout changed: update the unit and the README"
    stop = int(one(u, "Service", "TimeoutStopSec"))
    assert drain < stop <= drain + 60, (drain, stop)
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_agent_units_settings():
    """The system agent unit: a dedicated user from its sysusers entry, its
    --home is its StateDirectory; both agent units reload by SIGHUP, drain on
    SIGTERM and do not restart on a usage error."""
    u = parse_unit(UNITS / "tunnel-agent.service")
    argv = exec_argv(one(u, "Service", "ExecStart"))
    assert argv[0] == INSTALLED_BIN + "tunnel-agent"
    home = argv[argv.index("--home") + 1]
    assert home == "/var/lib/" + one(u, "Service", "StateDirectory")
    assert one(u, "Service", "User") == "tunnel-agent"
    sysusers = (UNITS / "tunnel-agent.sysusers").read_text()
    assert re.search(r"^u\s+tunnel-agent\s+-\s+\"[^\"]*\"\s+" + re.escape(home) + r"\s*$",
                     sysusers, re.M)
    assert one(u, "Service", "ProtectSystem") == "strict"
    assert one(u, "Service", "CapabilityBoundingSet") == ""
    for rel in ("tunnel-agent.service", "user/tunnel-agent.service"):
        v = parse_unit(UNITS / rel)
        assert one(v, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
        assert one(v, "Service", "KillSignal") == "SIGTERM"
        assert int(one(v, "Service", "TimeoutStopSec")) > 30  # the agent's own grace
        assert "2" in one(v, "Service", "RestartPreventExitStatus").split()
    assert one(parse_unit(UNITS / "user/tunnel-agent.service"), "Install", "WantedBy") == \
        "default.target"


def test_sysusers_entries_create_the_users(tmp_path):
    """systemd-sysusers, in a scratch root, creates both service users from
    the entries meson installs."""
    exe = need("systemd-sysusers", "systemd")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = sh(exe, f"--root={root}", UNITS / "tunnel-gateway.sysusers",
           UNITS / "tunnel-agent.sysusers")
    assert r.returncode == 0, r.stderr
    passwd = (root / "etc/passwd").read_text()
    assert re.search(r"^tunnel-gateway:x:\d+:\d+:[^:]*:/var/lib/tunnel-gateway:", passwd, re.M)
    assert re.search(r"^tunnel-agent:x:\d+:\d+:[^:]*:/var/lib/tunnel-agent:", passwd, re.M)


def test_meson_installs_the_units_with_their_bindir(tmp_path):
    """A fresh meson setup with another prefix installs the units under
    <prefix>/lib/systemd/{system,user}, the sysusers entries, the hook and the
    examples, and the installed units run <prefix>/bin."""
    need("meson", "meson")
    need("ninja", "ninja-build")
    b = tmp_path / "b"
    r = sh("meson", "setup", b, REPO, "--prefix=/opt/tg", "-Dtests=false")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    installed = json.loads(sh("meson", "introspect", "--installed", b, check=True).stdout)
    dests = set(installed.values())
    for want in ["/opt/tg/lib/systemd/system/tunnel-gateway.service",
                 "/opt/tg/lib/systemd/system/tunnel-agent.service",
                 "/opt/tg/lib/systemd/user/tunnel-agent.service",
                 "/opt/tg/lib/sysusers.d/tunnel-gateway.conf",
                 "/opt/tg/lib/sysusers.d/tunnel-agent.conf",
                 "/opt/tg/libexec/tunnel-gateway/certbot-deploy-hook",
                 "/opt/tg/share/doc/tunnel-gateway/examples/tunnel-gateway.conf",
                 "/opt/tg/share/doc/tunnel-gateway/examples/rfc2136.ini.example",
                 "/opt/tg/share/doc/tunnel-gateway/examples/tunnel-agent.default"]:
        assert want in dests, f"{want} not installed"
    targets = ["deploy/systemd/tunnel-gateway.service", "deploy/systemd/tunnel-agent.service",
               "deploy/systemd/user/tunnel-agent.service"]
    r = sh("ninja", "-C", b, *targets)
    assert r.returncode == 0, r.stdout + r.stderr
    for t in targets:
        built = (b / t).read_text()
        src = (REPO / t).read_text()
        assert built == src.replace(INSTALLED_BIN, "/opt/tg/bin/"), t
        assert "/opt/tg/bin/tunnel-" in built


# ---- the programs accept what the deploy files pass them -------------------------------

def test_gateway_unit_command_and_config(bin_path):
    """The unit's command line with deploy/tunnel-gateway.conf passes
    --check-config: every key of the file is a real one, read from the file,
    with no warning; the file's cert and key are where the hook writes."""
    argv = exec_argv(one(parse_unit(UNITS / "tunnel-gateway.service"), "Service", "ExecStart"))
    flags = help_flags(gateway_help(bin_path))
    for a in argv[1:]:
        if a.startswith("--"):
            assert a.split("=")[0] in flags, a
    args = [str(CONF) if a == "/etc/tunnel-gateway/tunnel-gateway.conf" else a for a in argv[1:]]
    r = check_config(bin_path, *args)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr, r.stderr
    keys = re.findall(r"^([a-z][a-z0-9-]*)\s*=", CONF.read_text(), re.M)
    assert {"domain", "listen", "cert", "key", "allow", "state-dir"} <= set(keys)
    for k in keys:
        assert effective(r.stdout, k)[1].startswith(f"file {CONF}:"), k
    hook = HOOK.read_text()
    cert_dir = re.search(r"TG_CERT_DIR:-([^}]+)\}", hook).group(1)
    assert effective(r.stdout, "cert")[0] == f'"{cert_dir}/fullchain.pem"'
    assert effective(r.stdout, "key")[0] == f'"{cert_dir}/privkey.pem"'
    assert effective(r.stdout, "allow")[0].startswith('"/etc/tunnel-gateway/')


def run_args_example():
    """TUNNEL_AGENT_RUN_ARGS as deploy/systemd/tunnel-agent.default sets it
    (its commented example when no line is active)."""
    text = (UNITS / "tunnel-agent.default").read_text()
    m = re.search(r"^TUNNEL_AGENT_RUN_ARGS=(.*)$", text, re.M) or \
        re.search(r"^#\s*TUNNEL_AGENT_RUN_ARGS=(.*)$", text, re.M)
    assert m, "no TUNNEL_AGENT_RUN_ARGS in tunnel-agent.default"
    return shlex.split(m.group(1))[0] if m.group(1).strip() else ""


def unit_agent_argv(rel, bin_path, home, run_args):
    """The unit's ExecStart as it runs: $TUNNEL_AGENT_RUN_ARGS split into
    words, the built program, --home moved to a scratch directory."""
    u = parse_unit(UNITS / rel)
    assert "TUNNEL_AGENT_RUN_ARGS=" in u["Service"]["Environment"]
    argv = []
    for a in exec_argv(one(u, "Service", "ExecStart")):
        argv += run_args.split() if a == "$TUNNEL_AGENT_RUN_ARGS" else [a]
    assert not [a for a in argv if "$" in a], argv
    argv[0] = str(bin_path("tunnel-agent"))
    if "--home" in argv:
        argv[argv.index("--home") + 1] = str(home)
    return argv


def check_agent_argv(argv, bin_path):
    """argv[1:] is [--home DIR] COMMAND [flags...] with each flag in COMMAND's help."""
    args = argv[1:]
    while args and args[0].startswith("--"):
        assert args[0].split("=")[0] in ("--home", "--help", "--version"), args[0]
        args = args[2:] if args[0] == "--home" else args[1:]  # --home DIR, or --home=DIR
    if not args:
        return
    cmd = args[0]
    assert cmd in agent_commands(bin_path) | {"help"}, f"tunnel-agent has no command {cmd!r}"
    if cmd == "help":
        return
    flags = agent_flags(bin_path, cmd)
    for a in args[1:]:
        if a.startswith("--"):
            assert a.split("=")[0] in flags, f"tunnel-agent {cmd} does not take {a}"


class Daemon(Proc):
    """A Proc whose environment is exactly env (Proc adds os.environ)."""

    def __init__(self, argv, log_path, env):
        self.log_path = Path(log_path)
        self.log = open(self.log_path, "wb")
        self.log_offset = 0
        self.p = subprocess.Popen([str(a) for a in argv], stdout=self.log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                  start_new_session=True)


def run_agent(argv, tmp_path, name, env):
    """Starts argv, waits for daemon_started, stops it with SIGTERM; returns
    the daemon_started line."""
    p = Daemon(argv, tmp_path / f"{name}.log", env)
    try:
        line = p.wait_log(r"event=daemon_started [^\n]*", timeout=T).group(0)
    finally:
        rc = p.stop(signal.SIGTERM, timeout=T)
    assert rc == 0, p.text()
    return line


def test_agent_units_run(bin_path, tmp_path):
    """The system unit's command line, with the default file's run options,
    starts the daemon for that gateway and remembers it; the user unit's
    (no options) exits 2 while no gateway is remembered, which
    RestartPreventExitStatus= keeps from looping, and starts once one is."""
    run_args = run_args_example()
    assert run_args.startswith("--gateway wss://")
    env = clean_env(XDG_CONFIG_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path / "nohome"))

    home = tmp_path / "system-home"
    argv = unit_agent_argv("tunnel-agent.service", bin_path, home, run_args)
    check_agent_argv(argv, bin_path)
    line = run_agent(argv, tmp_path, "system-agent", env)
    gw = run_args.split()[1]
    assert f"gateway={gw}" in line and f"home={home}" in line
    assert json.loads((home / "agents.json").read_text())["gateway"] == gw
    assert (home.stat().st_mode & 0o077) == 0

    argv = unit_agent_argv("user/tunnel-agent.service", bin_path, None, "")
    check_agent_argv(argv, bin_path)
    r = sh(*argv, env=env)
    assert r.returncode == 2 and "no gateway" in r.stderr, (r.returncode, r.stderr)
    # README step 6: one foreground run with --gateway, then the user unit
    first = [str(bin_path("tunnel-agent")), "run", "--gateway", gw]
    run_agent(first, tmp_path, "first-run", env)
    line = run_agent(argv, tmp_path, "user-agent", env)
    assert f"gateway={gw}" in line and f"home={tmp_path}/xdg/tunnel-agent" in line


def shell_commands(text):
    """The simple commands of shell text as argv lists (control operators
    split, redirections dropped, comments removed)."""
    cmds = []
    joined = re.sub(r"\\\n", " ", text)
    for line in joined.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        cur, skip = [], False
        for tok in lex:
            if skip:
                skip = False
                continue
            if tok in ("&&", "||", ";", "|", "(", ")", "&"):
                cmds.append(cur)
                cur = []
            elif tok in (">", ">>", "<", "2>", "2>&1"):
                skip = tok != "2>&1"
            else:
                cur.append(tok)
        cmds.append(cur)
    return [c for c in cmds if c]


DOCKER_RUN_VALUE_OPTS = {"-p", "--publish", "-v", "--volume", "--name", "-e", "--env",
                         "--env-file", "--mount", "--network", "--user", "-u", "--entrypoint"}


def program_argv(argv):
    """(program, args, in_image) if argv runs tunnel-gateway or tunnel-agent,
    directly, through sudo/runuser/env, or as the image in `docker run`; else None."""
    a = list(argv)
    while a:
        if re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", a[0]) or a[0] in ("sudo", "exec", "env"):
            a = a[1:]
        elif a[0] == "runuser":
            a = a[a.index("--") + 1:] if "--" in a else []
        elif a[0] == "docker" and len(a) > 1 and a[1] == "run":
            rest, i = a[2:], 0
            while i < len(rest) and rest[i].startswith("-"):
                i += 2 if rest[i] in DOCKER_RUN_VALUE_OPTS else 1
            if i < len(rest) and rest[i] == "tunnel-gateway":
                return "tunnel-gateway", rest[i + 1:], True
            return None
        else:
            break
    if a and os.path.basename(a[0]) in ("tunnel-gateway", "tunnel-agent"):
        return os.path.basename(a[0]), a[1:], False
    return None


def readme_blocks(lang):
    text = (DEPLOY / "README.md").read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def comment_commands(path):
    """Commands quoted in a file's # comments: lines indented by two or more
    spaces after the # that start with one of the programs, runuser or
    docker run, and their continuation lines."""
    lines, out, cont = Path(path).read_text().splitlines(), [], False
    for line in lines:
        m = re.match(r"^\s*#(\s*)(.*)$", line)
        if not m:
            cont = False
            continue
        body = m.group(2)
        if cont or (len(m.group(1)) >= 2 and
                    re.match(r"^(tunnel-gateway|tunnel-agent|runuser|docker run)\b", body)):
            out.append(body)
            cont = body.endswith("\\")
    return "\n".join(out)


def test_every_documented_command_is_accepted(bin_path, tmp_path):
    """Every tunnel-gateway and tunnel-agent command in deploy/README.md and
    in the comments of deploy/ files uses real commands and flags; each
    gateway one also passes --check-config as written."""
    sources = {"README.md": "\n".join(readme_blocks("sh"))}
    for f in [*UNITS.rglob("*.service"), DOCKERFILE, HOOK, UNITS / "tunnel-agent.default"]:
        sources[str(f.relative_to(DEPLOY))] = comment_commands(f)
    gw_flags = help_flags(gateway_help(bin_path))
    seen = {"tunnel-gateway": 0, "tunnel-agent": 0}
    for where, text in sources.items():
        for argv in shell_commands(text):
            hit = program_argv(argv)
            if hit is None:
                continue
            prog, args, in_image = hit
            seen[prog] += 1
            if prog == "tunnel-agent":
                check_agent_argv([prog, *args], bin_path)
                continue
            for a in args:
                if a.startswith("--"):
                    assert a.split("=")[0] in gw_flags, f"{where}: {a} in {argv}"
            args = [str(CONF) if a == "/etc/tunnel-gateway/tunnel-gateway.conf" else a
                    for a in args]
            r = check_config(bin_path, *args, env=dockerfile_env() if in_image else None)
            assert r.returncode == 0, f"{where}: {shlex.join(argv)}\n{r.stderr}"
    assert seen["tunnel-gateway"] >= 3 and seen["tunnel-agent"] >= 8, seen


def test_readme_config_snippets_load(bin_path, tmp_path):
    """Each ```toml block of deploy/README.md is a config file that passes
    --check-config, every key read from it, with no warning."""
    blocks = readme_blocks("toml")
    assert len(blocks) >= 2
    # the one file --check-config opens: a cluster secret (owner-only), here in scratch
    secret = tmp_path / "cluster.secret"
    secret.write_bytes(os.urandom(48))
    os.chmod(secret, 0o600)
    for i, block in enumerate(blocks):
        f = tmp_path / f"snippet{i}.conf"
        f.write_text(block.replace('"/etc/tunnel-gateway/cluster.secret"', f'"{secret}"'))
        r = check_config(bin_path, "--config", f)
        assert r.returncode == 0, f"README toml block {i}:\n{block}\n{r.stderr}"
        assert "warning" not in r.stderr, r.stderr
        for k in re.findall(r"^([a-z][a-z0-9-]*)\s*=", block, re.M):
            assert effective(r.stdout, k)[1].startswith(f"file {f}:"), (i, k)


# ---- Dockerfile ------------------------------------------------------------------------

def dockerfile_stages():
    """[(from_args, [(INSTRUCTION, args)])] with continuation lines joined and
    comment lines dropped, as docker does."""
    stages, logical = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if re.match(r"^\s*#", line):
            continue
        logical += line
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        if logical.strip():
            ins, _, args = logical.strip().partition(" ")
            if ins.upper() == "FROM":
                stages.append((args.strip(), []))
            else:
                stages[-1][1].append((ins.upper(), args.strip()))
        logical = ""
    return stages


def apt_installs(instructions):
    pkgs = []
    for ins, args in instructions:
        if ins != "RUN":
            continue
        toks = shlex.split(args)
        for i in range(len(toks) - 1):
            if toks[i] == "apt-get" and "install" in toks[i + 1:i + 3]:
                for t in toks[toks.index("install", i) + 1:]:
                    if t in ("&&", "||", ";"):
                        break
                    if not t.startswith("-"):
                        pkgs.append(t)
    return pkgs


def dockerfile_env():
    env = {}
    for _, instr in dockerfile_stages()[-1:]:
        for ins, args in instr:
            if ins == "ENV":
                for kv in shlex.split(args):
                    k, _, v = kv.partition("=")
                    env[k] = v
    return env


def apt_show(*pkgs):
    """Fails naming each of pkgs that apt-cache does not know (one apt-cache run)."""
    need("apt-cache", "apt")
    r = sh("apt-cache", "show", "--no-all-versions", *pkgs)
    known = set(re.findall(r"^Package: (\S+)$", r.stdout, re.M))
    missing = [p for p in pkgs if p not in known]
    assert not missing, f"apt-cache show: no package {missing} in Debian 12 (or run " \
        f"apt-get update): {r.stderr.strip()}"


def install_deps_build():
    text = (REPO / "scripts/install-deps.sh").read_text()
    return re.search(r'^BUILD="([^"]*)"', text, re.M).group(1).split()


def test_dockerfile_build_stage_packages():
    """The build stage is debian:12-slim, installs every package of
    install-deps.sh's BUILD list (each -dev one exists in Debian), and builds
    a release with meson options the project declares."""
    stages = dockerfile_stages()
    assert len(stages) == 2
    (src, build), (dst, runtime) = stages
    assert src.split()[0] == "debian:12-slim" and src.split()[-1] == "build"
    assert dst == "debian:12-slim"
    pkgs = apt_installs(build)
    want = install_deps_build()
    assert [p for p in want if p.endswith("-dev")], want
    missing = [p for p in want if p not in pkgs]
    assert not missing, f"the build stage lacks install-deps' BUILD packages {missing}"
    apt_show(*pkgs)
    run = " ".join(a for i, a in build if i == "RUN")
    assert "--buildtype=release" in run
    declared = set(re.findall(r"option\('([a-z_]+)'", (REPO / "meson_options.txt").read_text()))
    for opt in re.findall(r"-D([a-z_]+)=", run):
        assert opt in declared, f"-D{opt} is not in meson_options.txt"
    assert "meson install" in run


def needed_packages(binary):
    """The Debian packages holding each library that binary names as NEEDED."""
    need("readelf", "binutils")
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]",
                        sh("readelf", "-d", binary, check=True).stdout)
    # a sanitizer build's runtimes: the image builds a release without them
    needed = [n for n in needed if not re.match(r"^lib(a|ub|t|l)san\.so", n)]
    where = dict(re.findall(r"^\s*(\S+) => (\S+)", sh("ldd", binary, check=True).stdout, re.M))
    cands = {lib: [where[lib], os.path.realpath(where[lib]), "/usr" + where[lib],
                   where[lib].replace("/usr/", "/", 1)] for lib in needed}
    # one dpkg-query for all: it prints "pkg[:arch]: path" for each path it knows
    r = sh("dpkg-query", "-S", *sorted({c for cs in cands.values() for c in cs}))
    owner = {}
    for line in r.stdout.splitlines():
        pkg, _, path = line.partition(": ")
        owner[path.strip()] = pkg.split(":")[0]
    pkgs = {}
    for lib, cs in cands.items():
        found = [owner[c] for c in cs if c in owner]
        if not found:
            pytest.fail(f"no Debian package holds {where[lib]} ({lib} of {binary})")
        pkgs[lib] = found[0]
    return pkgs


def test_dockerfile_runtime_stage(bin_path):
    """The runtime stage installs Debian packages that exist and hold every
    library the two binaries link, runs the gateway as a non-root user with
    an EXPOSEd port that is its listen port, and has a /health HEALTHCHECK,
    STOPSIGNAL SIGTERM and ENTRYPOINT tunnel-gateway."""
    _, runtime = dockerfile_stages()[1]
    pkgs = apt_installs(runtime)
    apt_show(*pkgs)
    base = {"libc6"}  # in debian:12-slim already
    for prog in ("tunnel-gateway", "tunnel-agent"):
        for lib, pkg in needed_packages(bin_path(prog)).items():
            assert pkg in pkgs or pkg in base, f"{prog} links {lib} from {pkg}, not installed"
    instr = {}
    for ins, args in runtime:
        instr.setdefault(ins, []).append(args)
    user = instr["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    assert json.loads(instr["ENTRYPOINT"][-1]) == ["/usr/local/bin/tunnel-gateway"]
    copied = " ".join(instr["COPY"])
    assert "/staging/usr/local/bin/tunnel-gateway" in copied
    assert instr["STOPSIGNAL"] == ["SIGTERM"]
    health = instr["HEALTHCHECK"][-1]
    assert "/health" in health and "curl" in health and "curl" in pkgs
    env = dockerfile_env()
    r = check_config(bin_path, "--open", env=env)
    assert r.returncode == 0, r.stderr
    for k in env:
        assert k.startswith("TUNNEL_GATEWAY_")
        key = k[len("TUNNEL_GATEWAY_"):].lower().replace("_", "-")
        assert effective(r.stdout, key)[1] == f"env {k}", f"{k} is not an option's variable"
    port = effective(r.stdout, "listen")[0].strip('"').rsplit(":", 1)[1]
    assert instr["EXPOSE"] == [port]
    assert f"${{PORT:-{port}}}/health" in health
    assert "VOLUME" in instr and effective(r.stdout, "state-dir")[0].strip('"') in \
        instr["VOLUME"][-1]


def dockerignore_rx():
    rxs = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pat = line.strip()
        if not pat or pat.startswith("#"):
            continue
        assert not pat.startswith("!"), "exceptions are not modelled here"
        out = ""
        for i, part in enumerate(pat.strip("/").split("/")):
            if part == "**":
                out += "(?:[^/]+/)*"
                continue
            seg = "".join("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
                          for c in part)
            out += seg + "/"
        rxs.append(re.compile("^" + out[:-1] + "$"))
    return rxs


def docker_excluded(rel, rxs):
    parts = rel.split("/")
    return any(rx.match("/".join(parts[:i])) for rx in rxs for i in range(1, len(parts) + 1))


def test_dockerignore_keeps_sources_drops_build_dirs():
    """.dockerignore leaves out every meson build directory in the tree and
    .git, and keeps every file the meson build reads."""
    rxs = dockerignore_rx()
    # the names README.md and scripts use, and any meson build directory here
    build_dirs = {"build", "build-release", "build-asan", "build-fuzz", "build-junit"}
    build_dirs |= {d.name for d in REPO.iterdir() if d.is_dir() and
                   ((d / "meson-private").is_dir() or (d / "build.ninja").exists())}
    for d in sorted(build_dirs) + [".git"]:
        assert docker_excluded(d, rxs), f"{d} would be sent to docker build"
    kept = 0
    for top in ["meson.build", "meson_options.txt", "tg_version.h.in", "common", "gateway",
                "agent", "docs", "deploy", "bench", "tests", "proto", "scripts"]:
        paths = [REPO / top] if (REPO / top).is_file() else (REPO / top).rglob("*")
        for p in paths:
            rel = str(p.relative_to(REPO))
            if p.is_dir() or "__pycache__" in rel or rel.endswith(".pyc") \
                    or "node_modules" in rel:
                continue
            assert not docker_excluded(rel, rxs), f"{rel} would be left out of the image build"
            kept += 1
    assert kept > 50


# ---- certbot ---------------------------------------------------------------------------

def test_certbot_packages_and_credentials_example():
    """certbot and its RFC 2136 plugin exist in Debian 12 under the names the
    README installs; the credentials example uses the plugin's keys (2.1: the
    server an IP address, the algorithm in upper case, as it looks it up)."""
    readme = (DEPLOY / "README.md").read_text()
    assert "apt-get install -y certbot python3-certbot-dns-rfc2136" in readme
    apt_show("certbot", "python3-certbot-dns-rfc2136")
    ini = dict(re.findall(r"^(dns_rfc2136_[a-z_]+)\s*=\s*(\S+)\s*$",
                          (DEPLOY / "certbot/rfc2136.ini.example").read_text(), re.M))
    assert set(ini) == {"dns_rfc2136_" + k for k in ("server", "port", "name", "secret",
                                                      "algorithm")}
    socket.inet_pton(socket.AF_INET6 if ":" in ini["dns_rfc2136_server"] else socket.AF_INET,
                     ini["dns_rfc2136_server"])
    assert ini["dns_rfc2136_algorithm"] in {"HMAC-MD5", "HMAC-SHA1", "HMAC-SHA224",
                                            "HMAC-SHA256", "HMAC-SHA384", "HMAC-SHA512"}
    for flag in ("--dns-rfc2136", "--dns-rfc2136-credentials", "--deploy-hook",
                 "-d '*.example.com'", "-d example.com"):
        assert flag in readme, flag


def test_certbot_hook_is_valid_shell():
    """The hook is executable, passes sh -n, and shellcheck when installed."""
    assert os.access(HOOK, os.X_OK), "deploy/certbot/certbot-deploy-hook is not executable"
    assert HOOK.read_text().startswith("#!/bin/sh\n")
    r = sh("sh", "-n", HOOK)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck") is None:
        warnings.warn("shellcheck is not installed (apt-get install shellcheck): "
                      "only sh -n checked the certbot hook")
        return
    r = sh("shellcheck", "-s", "sh", HOOK)
    assert r.returncode == 0, r.stdout


FAKE_SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$FAKE_SYSTEMCTL_LOG"
case "$1" in
    is-active) exit "${FAKE_ACTIVE:-0}" ;;
    reload) if [ -n "${FAKE_GW_PID:-}" ]; then kill -HUP "$FAKE_GW_PID"; fi ;;
esac
exit 0
"""


class Certbot:
    """A fake certbot world: lineages laid out as certbot does (live/NAME/*.pem
    symlinks into archive/NAME/*N.pem), a systemctl on PATH that logs its
    arguments, and the hook run with certbot's environment."""

    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.bin = self.tmp / "bin"
        self.bin.mkdir()
        (self.bin / "systemctl").write_text(FAKE_SYSTEMCTL)
        (self.bin / "systemctl").chmod(0o755)
        self.log = self.tmp / "systemctl.log"
        self.dest = self.tmp / "etc/tunnel-gateway/tls"
        self.n = 0

    def lineage(self, cert_pem, key_pem, name="example.com"):
        self.n += 1
        archive = self.tmp / "letsencrypt/archive" / name
        live = self.tmp / "letsencrypt/live" / name
        archive.mkdir(parents=True, exist_ok=True)
        live.mkdir(parents=True, exist_ok=True)
        for base, data, mode in (("fullchain", cert_pem, 0o644), ("privkey", key_pem, 0o600)):
            f = archive / f"{base}{self.n}.pem"
            f.write_bytes(data)
            f.chmod(mode)
            link = live / f"{base}.pem"
            if link.is_symlink():
                link.unlink()
            link.symlink_to(f"../../archive/{name}/{base}{self.n}.pem")
        return live

    def hook(self, lineage, active=0, gw_pid=None):
        env = dict(os.environ, PATH=f"{self.bin}:{os.environ['PATH']}",
                   RENEWED_LINEAGE=str(lineage), RENEWED_DOMAINS="example.com *.example.com",
                   TG_CERT_DIR=str(self.dest), TG_CERT_USER=pwd.getpwuid(os.getuid()).pw_name,
                   TG_CERT_GROUP=grp.getgrgid(os.getgid()).gr_name,
                   FAKE_SYSTEMCTL_LOG=str(self.log), FAKE_ACTIVE=str(active),
                   FAKE_GW_PID=str(gw_pid or ""))
        if lineage is None:
            del env["RENEWED_LINEAGE"]
        return sh(HOOK, env=env)

    def calls(self):
        return self.log.read_text().splitlines() if self.log.exists() else []


def test_certbot_hook_installs_owner_only_and_reloads(tmp_path):
    """From a certbot lineage (symlinks), the hook writes regular files, the
    key 0600 and the chain 0640, owned by the service user, in a 0750
    directory, leaves no temporary file, and reloads only a running gateway;
    a lineage without its key changes nothing; no RENEWED_LINEAGE is an error."""
    cb = Certbot(tmp_path)
    live = cb.lineage(b"CHAIN ONE\n", b"KEY ONE\n")
    r = cb.hook(live)
    assert r.returncode == 0, r.stderr
    assert cb.calls() == ["is-active --quiet tunnel-gateway.service",
                          "reload tunnel-gateway.service"]
    for name, data, mode in (("fullchain.pem", b"CHAIN ONE\n", 0o640),
                             ("privkey.pem", b"KEY ONE\n", 0o600)):
        f = cb.dest / name
        st = f.lstat()
        assert not f.is_symlink() and f.read_bytes() == data
        assert oct(st.st_mode & 0o7777) == oct(mode), name
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert oct(cb.dest.stat().st_mode & 0o7777) == oct(0o750)
    assert sorted(p.name for p in cb.dest.iterdir()) == ["fullchain.pem", "privkey.pem"]

    # renewed while the gateway is stopped: installed, no reload
    cb.log.unlink()
    live = cb.lineage(b"CHAIN TWO\n", b"KEY TWO\n")
    r = cb.hook(live, active=3)
    assert r.returncode == 0, r.stderr
    assert cb.calls() == ["is-active --quiet tunnel-gateway.service"]
    assert (cb.dest / "privkey.pem").read_bytes() == b"KEY TWO\n"
    assert "not running" in r.stdout

    # a lineage without its key: exit 1, the installed pair untouched, no reload
    cb.log.unlink()
    (live / "privkey.pem").unlink()
    r = cb.hook(live)
    assert r.returncode == 1 and "privkey.pem" in r.stderr
    assert cb.calls() == []
    assert (cb.dest / "fullchain.pem").read_bytes() == b"CHAIN TWO\n"
    assert (cb.dest / "privkey.pem").read_bytes() == b"KEY TWO\n"

    r = cb.hook(None)
    assert r.returncode != 0 and "RENEWED_LINEAGE" in r.stderr


def make_cert(tmp, name, days):
    """A self-signed EC certificate for example.com and *.example.com."""
    need("openssl", "openssl")
    key, crt = tmp / f"{name}.key", tmp / f"{name}.crt"
    sh("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
       "-nodes", "-keyout", key, "-out", crt, "-days", str(days), "-subj", "/CN=example.com",
       "-addext", "subjectAltName=DNS:example.com,DNS:*.example.com", check=True)
    return crt.read_bytes(), key.read_bytes()


def tls_get(port, path):
    """(DER of the served certificate, status, body) of GET path on the apex,
    SNI and Host example.com."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # which certificate is served is the question
    with socket.create_connection(("127.0.0.1", port), timeout=T) as s:
        with ctx.wrap_socket(s, server_hostname="example.com") as t:
            der = t.getpeercert(binary_form=True)
            t.sendall(f"GET {path} HTTP/1.1\r\nHost: example.com\r\n"
                      "Connection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = t.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return der, int(head.split()[1]), body.decode()


def test_gateway_serves_hook_certificates_and_reloads(bin_path, tmp_path):
    """The gateway, started as the unit starts it (deploy config; listener,
    files and state moved to scratch places), serves the certificate the hook
    installed and answers /health on the apex; a renewal through the hook
    (its systemctl reload sends SIGHUP) makes it serve the new certificate,
    and the expiry metric follows; SIGTERM then drains and exits 0."""
    cb = Certbot(tmp_path)
    crt1, key1 = make_cert(tmp_path, "one", 10)
    r = cb.hook(cb.lineage(crt1, key1), active=3)
    assert r.returncode == 0, r.stderr
    allow = tmp_path / "allow.txt"
    allow.write_text("# none yet\n")
    argv = exec_argv(one(parse_unit(UNITS / "tunnel-gateway.service"), "Service", "ExecStart"))
    argv = [bin_path("tunnel-gateway"),
            *[str(CONF) if a == "/etc/tunnel-gateway/tunnel-gateway.conf" else a
              for a in argv[1:]],
            "--listen", "127.0.0.1:0", "--cert", cb.dest / "fullchain.pem",
            "--key", cb.dest / "privkey.pem", "--allow", allow,
            "--state-dir", tmp_path / "state", "--summary-interval", "0"]
    g = Daemon(argv, tmp_path / "gateway.log", clean_env())
    try:
        port = int(g.wait_log(r"event=listening addr=\S+ port=(\d+) scheme=https",
                              timeout=T).group(1))
        assert "event=tls_ready mode=file" in g.text()
        der, status, body = tls_get(port, "/health")
        assert der == ssl.PEM_cert_to_DER_cert(crt1.decode())
        assert status == 200 and json.loads(body)["status"] == "ok"

        def expiry():
            m = re.search(r"^tunnel_gateway_certificate_expiry_seconds (-?\d+)$",
                          tls_get(port, "/metrics")[2], re.M)
            assert m, "no certificate expiry metric"
            return int(m.group(1))
        assert expiry() < 11 * 86400

        crt2, key2 = make_cert(tmp_path, "two", 90)
        g.mark()
        r = cb.hook(cb.lineage(crt2, key2), gw_pid=g.pid())
        assert r.returncode == 0, r.stderr
        assert cb.calls()[-1] == "reload tunnel-gateway.service"
        g.wait_log(r"event=reloaded what=tls", timeout=T)
        want = ssl.PEM_cert_to_DER_cert(crt2.decode())
        wait_for(lambda: tls_get(port, "/health")[0] == want, T, "the renewed certificate")
        assert expiry() > 80 * 86400
        g.mark()
    finally:
        rc = g.stop(signal.SIGTERM, timeout=T)
    text = g.text()
    assert rc == 0, text[-3000:]
    assert 0 <= text.find("event=drain_start") < text.find("event=drain_done"), text[-3000:]
