"""tunnel-agent dials the gateway through an HTTP CONNECT proxy from
HTTPS_PROXY / HTTP_PROXY / ALL_PROXY, minus NO_PROXY, in both protocols (the
Osaurus app opens its socket through the user's proxy settings): the tunnel
and the probe go through it, the local API never does."""

import json
import os
import subprocess

import pytest

from connect_proxy import ConnectProxy
from helpers_daemon import curl
from local_api import LocalApi
from osaurus_relay import OsaurusRelay
from tunnel_env import Agent, Gateway, wait_for

NOENV = {k: "" for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                         "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY")}


def env(**kw):
    e = dict(NOENV)
    e.update(kw)
    return e


@pytest.fixture
def api():
    a = LocalApi()
    yield a
    a.stop()


def test_osaurus_relay_through_a_proxy_with_credentials(build_dir, tmp_path, api):
    relay = OsaurusRelay()
    proxy = ConnectProxy(user="me", password="p@ss word")
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("a1", api.url)
    # ws:// takes http_proxy; the password percent-encoded as in a URL
    ag.run(relay, "--protocol", "osaurus",
           env=env(http_proxy=f"http://me:p%40ss%20word@127.0.0.1:{proxy.port}"))
    try:
        ag.wait_connected(timeout=20)
        t = relay.wait_tunnels(1)
        r = t.request(addr, path="/echo?via=proxy").wait()
        assert r.status == 200
        targets = [c for c, _ in proxy.connects]
        # the tunnel and the probe, both to the relay; never the local API
        assert targets.count(f"localhost:{relay.port}") >= 2, proxy.connects
        assert all(a == proxy.auth for _, a in proxy.connects)
        assert not any(str(api.port) in c for c in targets)
        log = ag.proc.text()
        assert f"proxy=http://me@127.0.0.1:{proxy.port}" in log
        assert "p@ss" not in log and "p%40ss" not in log
    finally:
        ag.stop()
        proxy.stop()
        relay.stop()


def test_native_gateway_through_a_proxy_and_no_proxy(build_dir, tmp_path, api):
    gw = Gateway(build_dir, tmp_path)
    proxy = ConnectProxy()
    ag = Agent(build_dir, tmp_path)
    addr = ag.new("a1", api.url)
    # wss:// takes HTTPS_PROXY; TLS to the gateway runs inside the CONNECT
    ag.run(gw, env=env(HTTPS_PROXY=proxy.url, http_proxy="http://127.0.0.1:9"))
    try:
        ag.wait_connected(timeout=20)
        code, body = curl(gw, addr, "/echo")
        assert code == 200 and json.loads(body)["path"] == "/echo"
        assert proxy.tunnels >= 2
        assert {c for c, _ in proxy.connects} == {f"localhost:{gw.port}"}
    finally:
        ag.stop()
    # NO_PROXY: a domain suffix exempts the gateway; the proxy sees nothing more
    n = len(proxy.connects)
    ag.run(gw, env=env(HTTPS_PROXY=proxy.url, NO_PROXY="example.com, .localhost"))
    try:
        ag.wait_connected(timeout=20)
        assert len(proxy.connects) == n
    finally:
        ag.stop()
        proxy.stop()
        gw.stop()


def test_proxy_refusals_in_status(build_dir, tmp_path, api):
    relay = OsaurusRelay()
    proxy = ConnectProxy(user="u", password="right")
    ag = Agent(build_dir, tmp_path)
    ag.new("a1", api.url)
    ag.run(relay, "--protocol", "osaurus", env=env(ALL_PROXY=proxy.url))
    try:
        def refused():
            st = ag.status()
            e = st and (st.get("gateway") or {}).get("error")
            return e if e and "407" in e else None
        err = wait_for(refused, 20, "proxy refusal in status")
        assert f"proxy http://127.0.0.1:{proxy.port}" in err
        assert "CONNECT refused" in err and "Proxy Authentication Required" in err
        assert not relay.tunnels
    finally:
        ag.stop()
        proxy.stop()
        relay.stop()


@pytest.mark.parametrize("value,why", [
    ("socks5://127.0.0.1:1080", "only http:// proxies"),
    ("https://127.0.0.1:3128", "only http:// proxies"),
    ("http://127.0.0.1:99999", "port must be 1-65535"),
    ("http://:3128", "want [http://]"),
    ("http://u%zz@127.0.0.1:3128", "bad user or password"),
])
def test_bad_proxy_values_refused_at_start(build_dir, tmp_path, value, why):
    relay = OsaurusRelay()
    ag = Agent(build_dir, tmp_path)
    ag.new("a1", "http://127.0.0.1:9")
    try:
        e = dict(os.environ)
        e.update(env(http_proxy=value))
        r = subprocess.run([str(ag.exe), "--home", str(ag.home), "run", "--gateway",
                            f"ws://localhost:{relay.port}"], capture_output=True, text=True,
                           env=e, timeout=20, stdin=subprocess.DEVNULL)
        assert r.returncode == 2, r
        assert "http_proxy" in r.stderr and why in r.stderr, r.stderr
        assert not relay.connects
    finally:
        relay.stop()
