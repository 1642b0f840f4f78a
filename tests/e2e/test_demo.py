"""README's first command ends in scripts/demo.sh: it must start a gateway,
an agent and a local API, wait until each answers, and print curl commands
that work as printed; Ctrl-C stops everything."""

import json
import os
import re
import signal
import subprocess

import pytest

from tunnel_env import REPO, SANITIZED, wait_for

pytestmark = pytest.mark.skipif(SANITIZED, reason="the demo builds and runs the release build")

BUILD_TIMEOUT_S = 600  # the demo builds build-release first; from scratch that takes minutes
READY_LINE = "Ctrl-C stops everything."


def default_sigint():
    """A terminal's shell starts the demo with SIGINT at its default; a test run
    launched in the background of a non-interactive shell inherits it ignored,
    and a shell cannot trap a signal ignored on entry (POSIX), so Ctrl-C would
    do nothing. Start the demo as the terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def demo_env(tmp_path, **extra):
    env = {"DEMO_PORT": "0", "DEMO_API_PORT": "0", "DEMO_DIR": str(tmp_path / "demo"),
           "PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path)}
    env.update(extra)
    return env


def printed(out):
    """The address, the URL and the curl lines the demo printed."""
    addr = re.search(r"^  agent address: (0x[0-9a-f]{40})$", out, re.M)
    url = re.search(r"^  public URL:    (https://\S+)$", out, re.M)
    assert addr and url, out
    cmds = re.findall(r"^  (curl .*)$", out, re.M)
    assert len(cmds) == 4, out
    return addr.group(1), url.group(1), cmds


def run_printed(cmd, cwd):
    """Runs one printed line through the shell, as a user pasting it would."""
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30, cwd=cwd,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{cmd}\n{r.stderr[-2000:]}"
    return r.stdout


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_demo_prints_curl_commands_that_work_as_printed(tmp_path):
    out_path = tmp_path / "demo.out"
    with open(out_path, "wb") as out:
        p = subprocess.Popen(["sh", str(REPO / "scripts/demo.sh")], stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=demo_env(tmp_path), start_new_session=True,
                             preexec_fn=default_sigint)
    try:
        def ready():
            if p.poll() is not None:
                raise AssertionError(f"demo exited ({p.returncode}):\n{out_path.read_text()}")
            return READY_LINE in out_path.read_text()
        wait_for(ready, BUILD_TIMEOUT_S, "the demo's curl commands", interval=0.1)
        addr, url, cmds = printed(out_path.read_text())
        other_dir = tmp_path / "elsewhere"  # "in another terminal": not the repository
        other_dir.mkdir()

        hello = json.loads(run_printed(cmds[0], other_dir))
        assert cmds[0].endswith(f"{url}/hello")
        assert hello["path"] == "/hello"
        assert hello["origin"] == "public"
        assert hello["agent_address"] == addr
        assert hello["client"] == "127.0.0.1"

        stream = run_printed(cmds[1], other_dir)
        assert re.findall(r"^data: event (\d+) at [0-9.]+$", stream, re.M) == \
            [str(i) for i in range(10)], stream

        assert "--http2" in cmds[2]
        assert run_printed(cmds[2], other_dir) == "echo me"

        health = json.loads(run_printed(cmds[3], other_dir))
        assert health["status"] == "ok"
        assert health["agents"] == 1

        # Ctrl-C: the terminal signals the whole foreground process group
        os.killpg(p.pid, signal.SIGINT)
        try:
            assert p.wait(timeout=30) != 0
        except subprocess.TimeoutExpired:
            # which process held on, and what it was doing (for a rare CI stall)
            logs = {f.name: f.read_text(errors="replace")[-3000:]
                    for f in (tmp_path / "demo").glob("*.log")}
            ps = subprocess.run(["ps", "-o", "pid,stat,etime,args", "-g", str(p.pid)],
                                capture_output=True, text=True).stdout
            raise AssertionError(f"the demo did not stop within 30 s of Ctrl-C\n{ps}\n" +
                                 "\n".join(f"--- {k}\n{v}" for k, v in logs.items()))
        wait_for(lambda: not group_alive(p.pid), 30, "every demo process to exit")
    finally:
        if group_alive(p.pid):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def test_demo_waits_for_a_slow_local_api(tmp_path):
    # the local API listens only 2 s after it started: well after the gateway
    # and agent would be up, so a demo that does not wait calls it too early
    r = subprocess.run(["sh", str(REPO / "scripts/demo.sh")], capture_output=True, text=True,
                       timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL,
                       env=demo_env(tmp_path, DEMO_CHECK="1", DEMO_API_DELAY="2"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    addr, _, _ = printed(r.stdout)
    # DEMO_CHECK's own call through the tunnel is the last line of output
    check = json.loads(r.stdout.rstrip("\n").rsplit("\n", 1)[-1])
    assert check["origin"] == "public"
    assert check["agent_address"] == addr
    api_log = (tmp_path / "demo" / "api.log").read_text()
    assert re.search(r"^demo_api: listening port=\d+$", api_log, re.M), api_log


def test_demo_names_a_local_api_that_never_comes_up(tmp_path):
    r = subprocess.run(["sh", str(REPO / "scripts/demo.sh")], capture_output=True, text=True,
                       timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL,
                       env=demo_env(tmp_path, DEMO_CHECK="1", DEMO_API_DELAY="soon"))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert READY_LINE not in r.stdout
    assert "demo: the local API (scripts/demo_api.py) did not answer: it exited" in r.stderr
    assert "DEMO_API_DELAY='soon'" in r.stderr  # the API's own reason, from its log


def test_demo_refuses_a_bad_port(tmp_path):
    r = subprocess.run(["sh", str(REPO / "scripts/demo.sh")], capture_output=True, text=True,
                       timeout=60, stdin=subprocess.DEVNULL,
                       env=demo_env(tmp_path, DEMO_PORT="84x3"))
    assert r.returncode == 1
    assert "demo: DEMO_PORT=84x3: want a port number (0 to 65535)" in r.stderr
