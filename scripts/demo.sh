#!/bin/sh
# Builds the project and runs a demo on this machine: tunnel-gateway on
# https://localhost:8443 (local CA in ./demo/state), a small local API with a
# streaming endpoint on 127.0.0.1:8080, and tunnel-agent exposing it through
# the tunnel. Waits until each of them answers, then prints curl commands that
# work as printed; Ctrl-C stops all.
#
#   DEMO_PORT, DEMO_API_PORT  gateway and local API ports (0: any free port)
#   DEMO_DIR                  state, agent home and logs (default ./demo)
#   DEMO_CHECK=1              call the URL once after printing, then stop (tests)
#   DEMO_API_DELAY=SECONDS    the local API waits that long before listening
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=build-release
PORT=${DEMO_PORT:-8443}
API_PORT=${DEMO_API_PORT:-8080}
DEMO=${DEMO_DIR:-$ROOT/demo}
case "$DEMO" in /*) ;; *) DEMO="$ROOT/$DEMO" ;; esac
STATE="$DEMO/state"
HOME_DIR="$DEMO/agent-home"
AGENT="$ROOT/$BUILD/agent/tunnel-agent"

die() {
    echo "demo: $*" >&2
    exit 1
}

for v in "DEMO_PORT=$PORT" "DEMO_API_PORT=$API_PORT"; do
    case "${v#*=}" in
        "" | *[!0-9]*) die "$v: want a port number (0 to 65535)" ;;
    esac
    [ "${v#*=}" -le 65535 ] || die "$v: want a port number (0 to 65535)"
done
for c in meson ninja curl /usr/bin/python3; do
    command -v "$c" >/dev/null 2>&1 || die "$c is not installed; run ./scripts/install-deps.sh"
done

if [ ! -f "$BUILD/build.ninja" ]; then
    meson setup "$BUILD" --buildtype=release -Db_ndebug=false >/dev/null
fi
ninja -C "$BUILD" >/dev/null
mkdir -p "$DEMO"
chmod 700 "$DEMO"

pids=""
cleanup() {
    for p in $pids; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for WHAT SECONDS PID LOG CMD...: runs CMD every 0.1 s until it succeeds;
# fails with LOG's tail if PID exits first or SECONDS pass (by count and clock)
wait_for() {
    what=$1 secs=$2 pid=$3 log=$4
    shift 4
    n=0
    end=$(($(date +%s) + secs + 1))
    until "$@"; do
        kill -0 "$pid" 2>/dev/null || { tail -n 20 "$log" >&2; die "$what: it exited; see $log"; }
        n=$((n + 1))
        if [ $n -gt $((secs * 10)) ] || [ "$(date +%s)" -gt "$end" ]; then
            tail -n 20 "$log" >&2
            die "$what: not within $secs s; see $log"
        fi
        sleep 0.1
    done
}

/usr/bin/python3 "$ROOT/scripts/demo_api.py" --port "$API_PORT" >"$DEMO/api.log" 2>&1 &
api_pid=$!
pids="$pids $api_pid"
"$ROOT/$BUILD/gateway/tunnel-gateway" --listen "127.0.0.1:$PORT" --state-dir "$STATE" \
    >"$DEMO/gateway.log" 2>&1 &
gw_pid=$!
pids="$pids $gw_pid"

# the local API answers once it printed its port and a GET succeeds
api_up() {
    API_PORT=$(sed -n 's/^demo_api: listening port=\([0-9]*\)$/\1/p' "$DEMO/api.log")
    [ -n "$API_PORT" ] && curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:$API_PORT/hello"
}
wait_for "the local API (scripts/demo_api.py) did not answer" 20 "$api_pid" "$DEMO/api.log" api_up

if ! "$AGENT" --home "$HOME_DIR" list 2>/dev/null | grep -q '^demo '; then
    "$AGENT" --home "$HOME_DIR" new demo --target "http://127.0.0.1:$API_PORT" >/dev/null
fi
"$AGENT" --home "$HOME_DIR" set demo --target "http://127.0.0.1:$API_PORT" >/dev/null
"$AGENT" --home "$HOME_DIR" enable demo --yes >/dev/null

# the gateway creates its local CA, then logs the port it listens on
gw_up() {
    [ -f "$STATE/local-ca.pem" ] || return 1
    PORT=$(sed -n 's/.*event=listening addr=[^ ]* port=\([0-9]*\) scheme=https.*/\1/p' \
        "$DEMO/gateway.log" | head -n 1)
    [ -n "$PORT" ]
}
wait_for "the gateway did not start" 10 "$gw_pid" "$DEMO/gateway.log" gw_up

"$AGENT" --home "$HOME_DIR" run --gateway "wss://localhost:$PORT" --ca-file "$STATE/local-ca.pem" \
    >"$DEMO/agent.log" 2>&1 &
agent_pid=$!
pids="$pids $agent_pid"

ADDR=""
agent_up() {
    st=$("$AGENT" --home "$HOME_DIR" status --json 2>/dev/null || true)
    state=$(printf '%s' "$st" | /usr/bin/python3 -c 'import json,sys
try:
    a=json.load(sys.stdin)["agents"][0]; print(a["state"], a["address"])
except Exception: print("none -")' 2>/dev/null)
    ADDR=${state#* }
    [ "${state%% *}" = connected ]
}
wait_for "the agent did not connect" 15 "$agent_pid" "$DEMO/agent.log" agent_up

URL="https://$ADDR.localhost:$PORT"
cat <<MSG

tunnel-gateway, tunnel-agent and a local API are running.
  agent address: $ADDR
  public URL:    $URL
  local API:     http://127.0.0.1:$API_PORT
  logs:          $DEMO/*.log

Try (in another terminal):
  curl --cacert $STATE/local-ca.pem $URL/hello
  curl --cacert $STATE/local-ca.pem -N $URL/stream
  curl --cacert $STATE/local-ca.pem --http2 -d 'echo me' $URL/echo
  curl --cacert $STATE/local-ca.pem https://localhost:$PORT/health

Ctrl-C stops everything.
MSG
if [ "${DEMO_CHECK:-0}" = 1 ]; then
    # used by tests: call the URL once through the tunnel, then stop
    curl -fsS --max-time 10 --cacert "$STATE/local-ca.pem" "$URL/hello"
    exit 0
fi
wait
