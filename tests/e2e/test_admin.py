"""The /admin API on the apex, end to end: off (404) without
--admin-token-file, refused at start for a loose or short token file, 401
with WWW-Authenticate for a missing or wrong token, the agent list, and
disconnect and deny acting on a live tunnel."""

import json
import os
import subprocess

import pytest

from local_api import LocalApi
from tunnel_env import Agent, Gateway, wait_for

TOKEN = "t0k3n-" + "x" * 40


class Env:
    pass


def token_file(tmp, text=TOKEN, mode=0o600, name="admin.token"):
    p = tmp / name
    p.write_text(text + "\n")
    os.chmod(p, mode)
    return p


@pytest.fixture(scope="module")
def env(build_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin")
    e = Env()
    e.tmp = tmp
    e.api = LocalApi()
    e.gw = Gateway(build_dir, tmp, "--admin-token-file", token_file(tmp))
    e.agent = Agent(build_dir, tmp)
    e.addr = e.agent.new("a", e.api.url)
    e.agent.run(e.gw)
    e.agent.wait_connected(timeout=30)
    yield e
    e.agent.stop()
    e.gw.stop()
    e.api.stop()


def curl(gw, path, *args, host="localhost", method="GET", token=None):
    """(status, headers lowercased, body bytes)."""
    extra = ["-H", f"Authorization: Bearer {token}"] if token is not None else []
    r = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", str(gw.ca), "-X", method,
                        "-D", "-", "-o", "/dev/stderr", "--connect-to", "::127.0.0.1:",
                        *extra, *args, f"https://{host}:{gw.port}{path}"],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    head = r.stdout.decode().split("\r\n")
    status = int(head[0].split()[1])
    hdrs = {}
    for ln in head[1:]:
        if ":" in ln:
            k, _, v = ln.partition(":")
            hdrs[k.strip().lower()] = v.strip()
    return status, hdrs, r.stderr


def agent_status(env, host_addr):
    s, _, body = curl(env.gw, "/echo", host=f"{host_addr}.localhost")
    return s, body


def test_off_without_token_file(build_dir, tmp_path):
    gw = Gateway(build_dir, tmp_path)
    try:
        s, _, body = curl(gw, "/admin/agents", token=TOKEN)
        assert s == 404 and json.loads(body)["error"] == "not_found"
    finally:
        gw.stop()


@pytest.mark.parametrize("text,mode,why", [
    (TOKEN, 0o644, "not accessible to group or others"),
    ("short-token", 0o600, "needs 32"),
])
def test_bad_token_file_refused(build_dir, tmp_path, text, mode, why):
    p = token_file(tmp_path, text, mode)
    r = subprocess.run([str(build_dir / "gateway/tunnel-gateway"), "--listen", "127.0.0.1:0",
                        "--state-dir", str(tmp_path / "st"), "--admin-token-file", str(p)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "--admin-token-file" in r.stderr and why in r.stderr, r.stderr


def test_help_names_the_options(build_dir):
    r = subprocess.run([str(build_dir / "gateway/tunnel-gateway"), "--help"], capture_output=True,
                       text=True, timeout=30)
    for opt in ("--admin-token-file", "--access-log", "--metrics-agents"):
        assert opt in r.stdout


@pytest.mark.parametrize("token", [None, "wrong-" + "y" * 40, TOKEN[:-1], TOKEN + "z"])
def test_unauthorized(env, token):
    s, h, body = curl(env.gw, "/admin/agents", token=token)
    assert s == 401
    assert h["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["error"] == "unauthorized"


def test_agents_list(env):
    assert agent_status(env, env.addr)[0] == 200
    s, h, body = curl(env.gw, "/admin/agents", token=TOKEN)
    assert s == 200 and h["content-type"] == "application/json"
    agents = json.loads(body)["agents"]
    assert [a["address"] for a in agents] == [env.addr]
    a = agents[0]
    # the node is this gateway's --node-id (default HOST:PORT), as /health says
    s, h, body = curl(env.gw, "/health")
    assert a["node"] == json.loads(body)["machine"] and a["node"].endswith(f":{env.gw.port}")
    assert a["client_ip"] == "127.0.0.1"
    assert a["since"] > 1_600_000_000_000  # unix ms
    assert a["requests"] >= 1 and a["bytes_out"] > 0
    s, _, _ = curl(env.gw, "/admin/agents", token=TOKEN, method="DELETE")
    assert s == 405


def test_disconnect_live_tunnel(env):
    env.agent.proc.mark()
    gw_at = env.gw.mark()
    s, _, body = curl(env.gw, f"/admin/agents/{env.addr}/disconnect", token=TOKEN, method="POST")
    assert s == 200 and json.loads(body)["disconnected"] is True
    env.agent.proc.wait_log(rf"event=agent_removed .*addr={env.addr} .*reason=removed")
    assert "reason=admin" in env.gw.text(gw_at)
    s, _, body = curl(env.gw, "/admin/agents/0x" + "cd" * 20 + "/disconnect", token=TOKEN,
                      method="POST")
    assert s == 502 and json.loads(body)["error"] == "agent_offline"
    s, _, _ = curl(env.gw, "/admin/agents/0xnothex/disconnect", token=TOKEN, method="POST")
    assert s in (400, 404)


def test_deny_live_and_new(env):
    # the daemon reconnects after the disconnect above; wait for the route
    wait_for(lambda: agent_status(env, env.addr)[0] == 200, 30, "agent routed again")
    env.agent.proc.mark()
    s, _, body = curl(env.gw, f"/admin/deny/{env.addr}", token=TOKEN, method="POST")
    assert s == 200 and json.loads(body)["denied"] is True
    # gone from the live tunnel at once
    s, body = agent_status(env, env.addr)
    assert s == 502 and json.loads(body)["error"] == "agent_offline"
    env.agent.proc.wait_log(rf"event=agent_removed .*addr={env.addr} .*reason=not_allowed")
    s, _, body = curl(env.gw, "/admin/deny", token=TOKEN)
    assert json.loads(body)["deny"] == [env.addr]
    # a new registration is refused as not_allowed
    # (the daemon gives up on a not_allowed agent: restart it to register anew)
    env.agent.stop()
    env.gw.mark()
    env.agent.run(env.gw)
    env.gw.wait_log(r"event=auth_failed .*err=address_not_allowed", timeout=30)
    assert agent_status(env, env.addr)[0] == 502
    s, _, body = curl(env.gw, f"/admin/deny/{env.addr}", token=TOKEN, method="DELETE")
    assert s == 200 and json.loads(body)["was_denied"] is True
    s, _, body = curl(env.gw, "/admin/deny", token=TOKEN)
    assert json.loads(body)["deny"] == []
