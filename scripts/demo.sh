#!/bin/sh
# Builds the project and runs a demo on this machine: tunnel-gateway on
# https://localhost:8443 (local CA in ./demo/state), a small local API with a
# streaming endpoint on 127.0.0.1:8080, and tunnel-agent exposing it through
# the tunnel. Prints curl commands that work as printed; Ctrl-C stops all.
set -eu
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD=build-release
PORT=${DEMO_PORT:-8443}
API_PORT=${DEMO_API_PORT:-8080}
DEMO="$ROOT/demo"
STATE="$DEMO/state"
HOME_DIR="$DEMO/agent-home"

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
trap cleanup EXIT INT TERM

/usr/bin/python3 "$ROOT/scripts/demo_api.py" --port "$API_PORT" >"$DEMO/api.log" 2>&1 &
pids="$pids $!"
"$BUILD/gateway/tunnel-gateway" --listen "127.0.0.1:$PORT" --state-dir "$STATE" \
    >"$DEMO/gateway.log" 2>&1 &
pids="$pids $!"

AGENT="$BUILD/agent/tunnel-agent"
if ! "$AGENT" --home "$HOME_DIR" list 2>/dev/null | grep -q '^demo '; then
    "$AGENT" --home "$HOME_DIR" new demo --target "http://127.0.0.1:$API_PORT" >/dev/null
fi
"$AGENT" --home "$HOME_DIR" set demo --target "http://127.0.0.1:$API_PORT" >/dev/null
"$AGENT" --home "$HOME_DIR" enable demo --yes >/dev/null

# the gateway creates its local CA at start; wait for it and the port
i=0
while [ ! -f "$STATE/local-ca.pem" ] || ! grep -q "event=listening" "$DEMO/gateway.log"; do
    i=$((i + 1))
    if [ $i -gt 100 ]; then
        echo "demo: the gateway did not start; see $DEMO/gateway.log" >&2
        cat "$DEMO/gateway.log" >&2
        exit 1
    fi
    sleep 0.1
done
"$AGENT" --home "$HOME_DIR" run --gateway "wss://localhost:$PORT" --ca-file "$STATE/local-ca.pem" \
    >"$DEMO/agent.log" 2>&1 &
pids="$pids $!"

ADDR=""
i=0
while :; do
    st=$("$AGENT" --home "$HOME_DIR" status --json 2>/dev/null || true)
    state=$(printf '%s' "$st" | /usr/bin/python3 -c 'import json,sys
try:
    a=json.load(sys.stdin)["agents"][0]; print(a["state"], a["address"])
except Exception: print("none -")' 2>/dev/null)
    ADDR=${state#* }
    [ "${state%% *}" = connected ] && break
    i=$((i + 1))
    if [ $i -gt 150 ]; then
        echo "demo: the agent did not connect; see $DEMO/agent.log" >&2
        tail -n 20 "$DEMO/agent.log" >&2
        exit 1
    fi
    sleep 0.1
done

URL="https://$ADDR.localhost:$PORT"
cat <<MSG

tunnel-gateway, tunnel-agent and a local API are running.
  agent address: $ADDR
  public URL:    $URL
  logs:          $DEMO/*.log

Try (in another terminal):
  curl --cacert $STATE/local-ca.pem $URL/hello
  curl --cacert $STATE/local-ca.pem -N $URL/stream
  curl --cacert $STATE/local-ca.pem --http2 -d 'echo me' $URL/echo
  curl --cacert $STATE/local-ca.pem https://localhost:$PORT/health

Ctrl-C stops everything.
MSG
if [ "${DEMO_CHECK:-0}" = 1 ]; then
    # used by tests: call the URL once, then stop
    curl -sS --cacert "$STATE/local-ca.pem" "$URL/hello"
    exit 0
fi
wait
