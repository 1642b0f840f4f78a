"""Helpers for the agent daemon tests (test_agent_daemon.py): a gateway on a
fixed port (so that it can be restarted where the agent expects it), curl
calls through the tunnel, log scraping. Built on tunnel_env.py."""

import re
import subprocess
import time
from pathlib import Path

from tunnel_env import Proc, wait_for


class FixedGateway(Proc):
    """tunnel-gateway on 127.0.0.1:port with a given state dir (reused across
    restarts, so the local CA, and the agent's --ca-file, stay valid)."""

    def __init__(self, build_dir, tmp, port, name="gw", extra=()):
        self.state = Path(tmp) / f"{name}-state"
        self.domain = "localhost"
        self.port = port
        self.scheme = "https"
        self.ca = self.state / "local-ca.pem"
        argv = [Path(build_dir) / "gateway/tunnel-gateway", "--listen", f"127.0.0.1:{port}",
                "--state-dir", self.state, "--log-level", "debug", "--summary-interval", "0",
                *extra]
        super().__init__(argv, Path(tmp) / f"{name}-{int(time.time() * 1000)}.log")
        self.wait_log(r"event=listening addr=\S+ port=(\d+)")


def curl(gw, addr, path, *args, http="--http1.1", timeout=60):
    """GET (or whatever args say) https://<addr>.localhost:<port><path>.
    Returns (status, body bytes); status 0 if curl failed."""
    url = f"https://{addr}.localhost:{gw.port}{path}"
    r = subprocess.run(["curl", "-sS", http, "--cacert", str(gw.ca), "-o", "-", "-w",
                        "\n%{http_code}", *args, url], capture_output=True, timeout=timeout)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code or b"0"), body


def agent_state(agent, name):
    st = agent.status()
    if not st:
        return None
    for a in st.get("agents", []):
        if a.get("name") == name:
            return a
    return None


def wait_state(agent, name, state, timeout):
    def ok():
        a = agent_state(agent, name)
        return a if a is not None and a.get("state") == state else None
    return wait_for(ok, timeout, f"agent {name} {state}")


def log_values(proc, event, key):
    """Every value of key= on lines with event=<event> in proc's log."""
    rx = re.compile(rf"event={event}\b.*?\b{key}=(\S+)")
    return [m.group(1) for m in rx.finditer(proc.text())]
