"""Shared pytest fixtures for the end-to-end tests.

* build_dir: the meson build directory holding the binaries under test, from
  $TG_BUILD_DIR (default /work/main/build).
* bin_path(name): path of a built program ("tunnel-agent" -> agent/tunnel-agent).
* home: a fresh, empty temporary directory (tmp_path/home, not yet created).
* run(prog, *args, timeout=30, **kw): runs a program with a timeout, in its own
  session (so it has no controlling terminal and /dev/tty fails), stdin from
  /dev/null unless input= is given; returns subprocess.CompletedProcess with
  text stdout/stderr.
"""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Where meson puts each program inside the build directory.
_PROGRAMS = {
    "tunnel-agent": "agent/tunnel-agent",
    "tunnel-gateway": "gateway/tunnel-gateway",
}


@pytest.fixture(scope="session")
def build_dir() -> Path:
    d = Path(os.environ.get("TG_BUILD_DIR", "/work/main/build"))
    if not d.is_dir():
        pytest.fail(f"build directory {d} does not exist (set TG_BUILD_DIR)")
    return d


@pytest.fixture(scope="session")
def bin_path(build_dir):
    def resolve(name: str) -> Path:
        p = build_dir / _PROGRAMS.get(name, name)
        if not p.is_file():
            pytest.fail(f"{p} not built (ninja -C {build_dir})")
        return p

    return resolve


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture(scope="session")
def run(bin_path):
    def runner(prog, *args, timeout=30, input=None, env=None, **kw):
        exe = bin_path(prog) if "/" not in str(prog) else Path(prog)
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        return subprocess.run(
            [str(exe), *[str(a) for a in args]],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            start_new_session=True,
            **kw,
        )

    return runner
