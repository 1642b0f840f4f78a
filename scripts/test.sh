#!/bin/sh
# Builds and runs every test: unit tests (cmocka, via meson) and end-to-end
# tests (pytest, real processes on loopback), first in a release build, then
# in an AddressSanitizer + UndefinedBehaviorSanitizer build (memory-bound
# assertions are skipped there). Ends with one line "N passed, N failed, N skipped".
#
#   scripts/test.sh              both builds
#   scripts/test.sh --quick      release build only
#   scripts/test.sh --build-only configure and build the release build, no tests
#   TEST_FILTER=expr           passed to pytest -k
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=/usr/bin/python3
QUICK=0
BUILD_ONLY=0
case "${1:-}" in
    --quick) QUICK=1 ;;
    --build-only) BUILD_ONLY=1 ;;
    "") ;;
    *) echo "usage: $0 [--quick|--build-only]" >&2; exit 2 ;;
esac
JUNIT_DIR="$ROOT/build-junit"
rm -rf "$JUNIT_DIR"
mkdir -p "$JUNIT_DIR"
status=0

run_suite() { # name builddir meson-args...
    name=$1
    dir=$2
    shift 2
    echo "== $name: configure and build ($dir)"
    if [ ! -f "$dir/build.ninja" ]; then
        meson setup "$dir" -Dwerror=true "$@" >"$JUNIT_DIR/$name-setup.log" 2>&1 ||
            { cat "$JUNIT_DIR/$name-setup.log"; echo "$name: meson setup failed"; status=1; return; }
    fi
    if ! ninja -C "$dir" >"$JUNIT_DIR/$name-build.log" 2>&1; then
        cat "$JUNIT_DIR/$name-build.log"
        echo "$name: build failed"
        status=1
        return
    fi
    [ "$BUILD_ONLY" = 1 ] && return
    echo "== $name: unit tests and the benchmark's own tests"
    meson test -C "$dir" --suite unit --suite bench --print-errorlogs >"$JUNIT_DIR/$name-unit.log" 2>&1 || status=1
    tail -n 12 "$JUNIT_DIR/$name-unit.log"
    cp "$dir/meson-logs/testlog.junit.xml" "$JUNIT_DIR/$name-unit.xml" 2>/dev/null
    echo "== $name: end-to-end tests"
    TG_BUILD_DIR="$ROOT/$dir" TG_SANITIZED=$([ "$name" = asan ] && echo 1 || echo 0) \
        $PY -m pytest -q -p no:cacheprovider tests/e2e --junitxml="$JUNIT_DIR/$name-e2e.xml" \
        ${TEST_FILTER:+-k "$TEST_FILTER"} || status=1
}

run_suite release build-release --buildtype=release -Db_ndebug=false
if [ "$BUILD_ONLY" = 1 ]; then
    exit $status
fi
if [ "$QUICK" = 0 ]; then
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    export ASAN_OPTIONS UBSAN_OPTIONS
    run_suite asan build-asan -Db_sanitize=address,undefined -Db_lundef=false
fi

$PY - "$JUNIT_DIR" <<'PYEOF'
import glob, sys, xml.etree.ElementTree as ET
p = f = s = 0
for path in sorted(glob.glob(sys.argv[1] + "/*.xml")):
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        f += 1
        continue
    for tc in root.iter("testcase"):
        kinds = {c.tag for c in tc}
        if "failure" in kinds or "error" in kinds:
            f += 1
        elif "skipped" in kinds:
            s += 1
        else:
            p += 1
print(f"{p} passed, {f} failed, {s} skipped")
sys.exit(1 if f else 0)
PYEOF
rc=$?
[ $status -ne 0 ] && rc=1
exit $rc
