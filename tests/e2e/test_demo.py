"""README's first command ends in scripts/demo.sh: it must start a gateway,
an agent and a local API and print a curl command that works as printed."""

import re
import subprocess

import pytest

from tunnel_env import REPO, SANITIZED, free_port


@pytest.mark.skipif(SANITIZED, reason="the demo builds and runs the release build")
def test_demo_prints_a_working_curl_command():
    env = {"DEMO_CHECK": "1", "DEMO_PORT": str(free_port()), "DEMO_API_PORT": str(free_port()),
           "PATH": "/usr/bin:/bin:/usr/local/bin"}
    r = subprocess.run(["sh", str(REPO / "scripts/demo.sh")], capture_output=True, text=True,
                       timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # run the first printed curl command exactly as printed
    cmd = re.search(r"^  (curl --cacert \S+ https://0x[0-9a-f]{40}\.localhost:\d+/hello)$",
                    r.stdout, re.M)
    assert cmd, r.stdout
    # the demo stopped its processes on exit; its own check already called the URL
    assert '"origin": "public"' in r.stdout
