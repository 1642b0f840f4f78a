"""--node-id and --region where operators and the Osaurus app read them:
/health ("machine", "region"), /stats, /metrics, the listening log line,
/admin/agents; a bad node id refused at start."""

import json
import os
import re
import ssl
import subprocess
import urllib.request

import pytest

from tunnel_env import Agent, Gateway
from local_api import LocalApi

TOKEN = "admin-secret-0123456789abcdef-0123456789"


def get(gw, path, token=None):
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    req = urllib.request.Request(f"https://localhost:{gw.port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
        return json.loads(r.read()) if "json" in r.headers["content-type"] else r.read().decode()


def test_node_id_and_region_everywhere(build_dir, tmp_path):
    tok = tmp_path / "admin-token"
    tok.write_text(TOKEN)
    os.chmod(tok, 0o600)
    api = LocalApi()
    gw = Gateway(build_dir, tmp_path, "--node-id", "gw-a.eu:1", "--region", 'eu "west"',
                 "--admin-token-file", tok)
    agent = Agent(build_dir, tmp_path)
    try:
        addr = agent.new("api", api.url)
        agent.run(gw)
        agent.wait_connected(timeout=30)
        assert re.search(r"event=listening .*node=gw-a\.eu:1 ", gw.text())
        h = get(gw, "/health")
        # the region's quotes escaped: still one JSON document
        assert (h["machine"], h["region"], h["status"], h["agents"]) == \
            ("gw-a.eu:1", 'eu "west"', "ok", 1)
        s = get(gw, "/stats")
        assert (s["machine"], s["region"]) == ("gw-a.eu:1", 'eu "west"')
        for k in ("total_takeovers", "total_invalid_frames", "total_bad_host_responses",
                  "total_slow_consumer_aborts"):
            assert s[k] == 0, k
        m = get(gw, "/metrics")
        assert re.search(r'^tunnel_gateway_build_info\{version="[^"]+",node="gw-a\.eu:1"\} 1$',
                         m, re.M)
        agents = get(gw, "/admin/agents", TOKEN)["agents"]
        assert [(a["address"], a["node"]) for a in agents] == [(addr, "gw-a.eu:1")]
    finally:
        agent.stop()
        gw.stop()
        api.stop()


@pytest.mark.parametrize("bad", ["has space", "x" * 65, "a/b", "é"])
def test_bad_node_id_refused(build_dir, tmp_path, bad):
    r = subprocess.run([str(build_dir / "gateway/tunnel-gateway"), "--check-config",
                        "--state-dir", str(tmp_path), "--node-id", bad],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--node-id" in r.stdout + r.stderr and "A-Z a-z 0-9 . _ : -" in r.stdout + r.stderr


def test_default_node_id_is_host_and_port(build_dir, tmp_path):
    gw = Gateway(build_dir, tmp_path)
    try:
        assert get(gw, "/health")["machine"].endswith(f":{gw.port}")
    finally:
        gw.stop()
