"""tunnel-agent new|set --preset osaurus: the local API (an Osaurus server)
gets the agent id under X-Osaurus-Agent-Id and X-Osaurus-Relay-Origin: 1
exactly once, last, whatever the client sent; list and status show it.
Through tunnel-gateway in both protocols, and through the test relay."""

import json

import pytest

from helpers_daemon import curl
from local_api import LocalApi
from osaurus_relay import OsaurusRelay
from tunnel_env import Agent, Gateway


@pytest.fixture
def api():
    a = LocalApi()
    yield a
    a.stop()


def raw_headers(api):
    """The last request's header fields in order, as (name, value)."""
    return list(api.state.last_headers.raw_items())


def check_marked(api, agent_id):
    hs = raw_headers(api)
    origin = [v for k, v in hs if k.lower() == "x-osaurus-relay-origin"]
    assert origin == ["1"], hs
    assert hs[-1] == ("X-Osaurus-Relay-Origin", "1"), hs  # stamped last
    assert [v for k, v in hs if k.lower() == "x-osaurus-agent-id"] == [agent_id]
    assert not [k for k, _ in hs if k.lower() == "x-agent-id"]


@pytest.mark.parametrize("protocol", ["native", "osaurus"])
def test_preset_osaurus_through_the_gateway(build_dir, tmp_path, api, protocol):
    gw = Gateway(build_dir, tmp_path)
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("osr", api.url, extra=("--preset", "osaurus"))
    ag.run(gw, "--protocol", protocol)
    try:
        st = ag.wait_connected(timeout=20)
        a = st["agents"][0]
        assert a["preset"] == "osaurus" and a["id_header"] == "X-Osaurus-Agent-Id"
        # a client trying to look local: its copies are removed, ours is the one
        code, _ = curl(gw, addr, "/echo", "-H", "X-Osaurus-Relay-Origin: 0",
                       "-H", "x-osaurus-relay-origin: local", "-H", "X-Osaurus-Agent-Id: forged")
        assert code == 200
        check_marked(api, a["id"])
        # the Osaurus app's health probe goes to the local API, never answered on
        # the way (the test API has no /health: its own 404 comes back)
        code, body = curl(gw, addr, "/health", "-A", "OsaurusRelayHealthCheck/1")
        assert code == 404 and json.loads(body) == {"error": "nope"}
        assert api.state.paths[-1] == "/health"
        assert api.state.last_headers["User-Agent"] == "OsaurusRelayHealthCheck/1"
        check_marked(api, a["id"])
    finally:
        ag.stop()
        gw.stop()


def test_preset_osaurus_through_the_relay(build_dir, tmp_path, api):
    relay = OsaurusRelay()
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("osr", api.url, extra=("--preset", "osaurus"))
    ag.run(relay, "--protocol", "osaurus")
    try:
        st = ag.wait_connected(timeout=20)
        t = relay.wait_tunnels(1)
        r = t.request(addr, path="/echo", headers={"x-osaurus-relay-origin": "0"}).wait()
        assert r.status == 200
        check_marked(api, st["agents"][0]["id"])
    finally:
        ag.stop()
        relay.stop()


def test_preset_set_list_status_and_back(build_dir, tmp_path, api):
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("plain", api.url, enable=False)
    lst = ag.cli("list").stdout
    assert "PRESET" not in lst  # the column only when some agent has one
    out = ag.cli("set", "plain", "--preset", "osaurus").stdout
    assert "preset:           osaurus" in out and "X-Osaurus-Agent-Id" in out
    lines = ag.cli("list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "ADDRESS", "TARGET", "ENABLED", "PRESET"]
    assert lines[1].split() == ["plain", addr, api.url, "no", "osaurus"]
    st = ag.status()
    assert st["agents"][0]["preset"] == "osaurus"
    assert "preset: osaurus" in ag.cli("status").stdout
    # an explicit --id-header wins over the preset's
    ag.cli("set", "plain", "--preset", "osaurus", "--id-header", "X-Mine")
    assert ag.status()["agents"][0]["id_header"] == "X-Mine"
    ag.cli("set", "plain", "--preset", "osaurus")
    ag.cli("set", "plain", "--preset", "none")
    a = ag.status()["agents"][0]
    assert a["preset"] == "none" and a["id_header"] == "X-Agent-Id"
    bad = ag.cli("set", "plain", "--preset", "ollama", check=False)
    assert bad.returncode == 2 and "want osaurus or none" in bad.stderr
    bad = ag.cli("new", "x", "--target", api.url, "--preset", "", check=False)
    assert bad.returncode == 2
    # agents.json keeps it, and refuses a bad one
    home = ag.home / "agents.json"
    doc = json.loads(home.read_text())
    doc["agents"][0]["preset"] = "weird"
    home.write_text(json.dumps(doc))
    r = ag.cli("list", check=False)
    assert r.returncode != 0 and "preset" in r.stderr
