#!/bin/sh
# Installs everything needed to build, test and demo tunnel-gateway and
# tunnel-agent on Debian 12. Idempotent. Run it as yourself: as root it calls
# apt-get directly, otherwise through sudo, and only if a package is missing.
set -eu

BUILD="build-essential pkg-config meson ninja-build git
  libevent-dev libssl-dev libsecp256k1-dev libnghttp2-dev libcjson-dev
  libwslay-dev libhttp-parser-dev libinih-dev libhiredis-dev uuid-dev"
TEST="libcmocka-dev curl nghttp2-client openssl procps prometheus tmux
  python3 python3-pytest python3-websockets python3-ecdsa python3-pycryptodome
  python3-h2 python3-yaml chromium nodejs node-ws valgrind haproxy systemd shellcheck redis-server
  docker-compose"
BENCH="nginx-light wrk util-linux pagekite"
FUZZ="clang libclang-rt-14-dev"

# --build: compile only; default (--all): build, tests, demo and benchmark
want="$BUILD"
case "${1:-}" in
    --build) ;;
    ""|--all) want="$BUILD $TEST $BENCH $FUZZ" ;;
    *) echo "usage: $0 [--build|--all]" >&2; exit 2 ;;
esac

missing=""
for p in $want; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" ||
        missing="$missing $p"
done
if [ -z "$missing" ]; then
    echo "install-deps: all packages present"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-deps: missing:$missing" >&2
        echo "install-deps: installing needs root, and sudo is not installed; run this as root" \
            "(su -c '$0${1:+ $1}')" >&2
        exit 1
    fi
    SUDO="sudo"
fi
echo "install-deps: installing:$missing"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
# shellcheck disable=SC2086
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
