"""/metrics and the access log, end to end: a real gateway, agent daemon and
local API on loopback. The exposition must pass promtool, its counters must
match the requests this test made, per-agent series follow --metrics-agents,
and --access-log FILE gets one line per request with the request id that
also reached the local API as X-Request-Id."""

import json
import os
import re
import shutil
import signal
import stat
import subprocess

import pytest

from local_api import LocalApi
from tunnel_env import Agent, Gateway, wait_for

UNKNOWN = "0x" + "ab" * 20


class Env:
    pass


@pytest.fixture(scope="module")
def env(build_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    e = Env()
    e.tmp = tmp
    e.api = LocalApi()
    e.access = tmp / "access.log"
    e.gw = Gateway(build_dir, tmp, "--access-log", e.access, "--metrics-agents", "1",
                   "--log-level", "info")
    e.agent = Agent(build_dir, tmp)
    e.addr = e.agent.new("a", e.api.url)
    e.addr_b = e.agent.new("b", e.api.url)
    e.agent.run(e.gw)
    e.agent.wait_connected(timeout=30)
    yield e
    e.agent.stop()
    e.gw.stop()
    e.api.stop()


def curl(gw, host, path, *args):
    """(status, body bytes) of one HTTP/1.1 request through the gateway."""
    r = subprocess.run(["curl", "-sS", "--http1.1", "--cacert", str(gw.ca), "-o", "-",
                        "-w", "\n%{http_code}", "--connect-to", "::127.0.0.1:", *args,
                        f"https://{host}:{gw.port}{path}"], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code), body


def scrape(gw):
    status, body = curl(gw, "localhost", "/metrics")
    assert status == 200
    return body.decode()


def value(text, series):
    """The sample value of one exact series name{labels}, or None."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, v = line.rpartition(" ")
        if name == series:
            return float(v)
    return None


def promtool_check(text):
    exe = shutil.which("promtool")
    assert exe is not None, "promtool missing: apt-get install -y prometheus"
    r = subprocess.run([exe, "check", "metrics"], input=text.encode(), capture_output=True,
                       timeout=30)
    # promtool exits 0 when the text parses; lint remarks (if any) go to stdout
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def test_counters_match_requests(env):
    before = scrape(env.gw)
    promtool_check(before)
    host = f"{env.addr}.localhost"
    for _ in range(5):
        assert curl(env.gw, host, "/echo")[0] == 200
    for _ in range(2):
        status, body = curl(env.gw, f"{UNKNOWN}.localhost", "/")
        assert status == 502
        assert json.loads(body)["error"] == "agent_offline"
    after = scrape(env.gw)
    promtool_check(after)

    def delta(series):
        return value(after, series) - (value(before, series) or 0)

    assert delta('tunnel_gateway_http_responses_total{code="2xx"}') == 5
    assert delta('tunnel_gateway_http_responses_total{code="5xx"}') == 2
    assert delta('tunnel_gateway_http_errors_total{error="agent_offline"}') == 2
    assert delta("tunnel_gateway_http_request_duration_seconds_count") == 7
    assert delta("tunnel_gateway_http_time_to_headers_seconds_count") == 7
    assert delta('tunnel_gateway_http_request_duration_seconds_bucket{le="+Inf"}') == 7
    assert delta("tunnel_gateway_requests_total") == 7  # the older name still works
    assert value(after, "tunnel_gateway_tunnels") == 1
    assert value(after, "tunnel_gateway_agents") == 2
    assert value(after, 'tunnel_gateway_tunnel_auth_total{outcome="ok"}') >= 1
    assert value(after, 'tunnel_gateway_rate_limited_total{kind="conns_per_ip"}') == 0
    assert value(after, "tunnel_gateway_active_websockets") == 0
    assert value(after, "tunnel_gateway_certificate_expiry_seconds") > 86400
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "process_open_fds") > 0
    assert re.search(r'^tunnel_gateway_build_info\{version="[^"]+",node="[^"]+:\d+"\} 1$', after,
                     re.M)


def test_top_agents_only(env):
    for _ in range(3):
        assert curl(env.gw, f"{env.addr}.localhost", "/echo")[0] == 200
    assert curl(env.gw, f"{env.addr_b}.localhost", "/echo")[0] == 200
    text = scrape(env.gw)
    promtool_check(text)
    series = re.findall(r'^tunnel_gateway_agent_requests_total\{agent="(0x[0-9a-f]{40})"\} (\d+)$',
                        text, re.M)
    assert [a for a, _ in series] == [env.addr]  # --metrics-agents 1: the busiest only
    assert int(series[0][1]) >= 3
    assert value(text, f'tunnel_gateway_agent_errors_total{{agent="{env.addr}"}}') == 0


def test_no_agent_series_by_default(build_dir, tmp_path):
    api = LocalApi()
    gw = Gateway(build_dir, tmp_path)
    agent = Agent(build_dir, tmp_path)
    try:
        addr = agent.new("x", api.url)
        agent.run(gw)
        agent.wait_connected(timeout=30)
        assert curl(gw, f"{addr}.localhost", "/echo")[0] == 200
        text = scrape(gw)
        promtool_check(text)
        assert "tunnel_gateway_agent_requests_total" not in text
        assert value(text, "tunnel_gateway_agents") == 1
    finally:
        agent.stop()
        gw.stop()
        api.stop()


def access_lines(env, rid):
    return [ln for ln in env.access.read_text().splitlines()
            if "event=request" in ln and f"rid={rid} " in ln]


def test_access_log_and_request_id(env):
    host = f"{env.addr}.localhost"
    assert stat.S_IMODE(os.stat(env.access).st_mode) == 0o600
    # a valid client id is kept, reaches the local API and names the line
    status, body = curl(env.gw, host, "/echo?token=secret", "-H", "X-Request-Id: client.id_42-x")
    assert status == 200
    assert json.loads(body)["headers"]["x-request-id"] == ["client.id_42-x"]
    lines = wait_for(lambda: access_lines(env, "client.id_42-x"), 10, "access line")
    assert len(lines) == 1
    line = lines[0]
    for field in ("conn=", "client=127.0.0.1", f"addr={env.addr}", "method=GET",
                  "path=/echo ", "status=200", "bytes_in=0", "bytes_out=", "ttfb_ms=",
                  "dur_ms=", "outcome=done"):
        assert field in line, (field, line)
    assert "secret" not in line  # query string dropped at --log-level info
    # none sent: the gateway's id, the same in the local API and the log
    status, body = curl(env.gw, host, "/echo")
    rid = json.loads(body)["headers"]["x-request-id"]
    assert len(rid) == 1 and re.fullmatch(r"[0-9a-f]{32}", rid[0])
    assert len(wait_for(lambda: access_lines(env, rid[0]), 10, "access line")) == 1
    # invalid ones (a space; 129 characters) are replaced
    for bad in ("bad id", "a" * 129):
        status, body = curl(env.gw, host, "/echo", "-H", f"X-Request-Id: {bad}")
        got = json.loads(body)["headers"]["x-request-id"]
        assert len(got) == 1 and re.fullmatch(r"[0-9a-f]{32}", got[0]), got
    # an error has its line too, with its code
    status, _ = curl(env.gw, f"{UNKNOWN}.localhost", "/", "-H", "X-Request-Id: err-1")
    assert status == 502
    line = wait_for(lambda: access_lines(env, "err-1"), 10, "error line")[0]
    assert "status=502" in line and "err=agent_offline" in line
    # the main log no longer carries request lines
    assert "rid=client.id_42-x" not in env.gw.text()


def test_access_log_reopened_on_sighup(env):
    rotated = env.tmp / "access.log.1"
    os.rename(env.access, rotated)
    env.gw.mark()
    env.gw.p.send_signal(signal.SIGHUP)
    env.gw.wait_log(r"event=reloaded what=access_log")
    assert curl(env.gw, f"{env.addr}.localhost", "/echo", "-H", "X-Request-Id: after-hup")[0] == 200
    assert len(wait_for(lambda: env.access.exists() and access_lines(env, "after-hup"), 10,
                        "line in the new file")) == 1
    assert "after-hup" not in rotated.read_text()


def test_access_log_off(build_dir, tmp_path):
    gw = Gateway(build_dir, tmp_path, "--access-log", "off")
    try:
        status, _ = curl(gw, f"{UNKNOWN}.localhost", "/", "-H", "X-Request-Id: off-1")
        assert status == 502
        text = scrape(gw)
        assert value(text, 'tunnel_gateway_http_errors_total{error="agent_offline"}') == 1
        assert "rid=off-1" not in gw.text()
    finally:
        gw.stop()
