#!/usr/bin/env bash
# Runs the libFuzzer targets (fuzz/fuzz_*.c, docs/FUZZING.md) for SECONDS each:
#   scripts/fuzz.sh SECONDS [TARGET...]     (default: every target)
# Configures and builds build-fuzz with clang (ASan + UBSan, coverage on every
# file) when needed, runs each target against a scratch copy of its corpus
# fuzz/corpus/<name> with its dictionary fuzz/<name>.dict if there is one, then
# merges what the run found back into fuzz/corpus/<name> with -merge=1 (only
# inputs that reach a new edge; FUZZ_MERGE=0 skips it, as CI should). One line per target:
# executions, coverage (cov/ft), corpus size, wall and CPU seconds. Exits 1 if
# any target crashed, leaked, timed out or ran out of memory; the reproducer
# is kept under build-fuzz/fuzz-artifacts/<name>/ and named in the output.
# Environment: FUZZ_JOBS (targets run at once, default 1), FUZZ_NICE (default
# 10), FUZZ_TIMEOUT (seconds per input, default 30), FUZZ_RSS_MB (default
# 2048), FUZZ_MERGE (default 1), FUZZ_ARGS (more libFuzzer flags), FUZZ_JUNIT
# (a file: one JUnit test case per target, for scripts/test.sh's count).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build-fuzz"
all_targets="h1_head tun_h2_gw tun_h2_agent osr_agent osr pp cfg hex_sig tun_msg ws insp_ws insp_load rds"

usage() {
    echo "usage: $0 SECONDS [TARGET...]   targets: $all_targets" >&2
    exit 2
}
[ $# -ge 1 ] || usage
secs=$1
shift
case "$secs" in
    '' | *[!0-9]*) usage ;;
esac
targets=${*:-$all_targets}
for t in $targets; do
    case " $all_targets " in
        *" $t "*) ;;
        *) echo "fuzz: unknown target $t" >&2; usage ;;
    esac
done

cc=${CC:-clang}
if ! command -v "$cc" >/dev/null 2>&1; then
    echo "fuzz: $cc not found; on Debian 12: apt-get install clang libclang-rt-14-dev" >&2
    exit 2
fi
if ! echo 'int LLVMFuzzerTestOneInput(const unsigned char *d, unsigned long n) { return 0; }' |
    "$cc" -x c -fsanitize=fuzzer,address,undefined -o /dev/null - >/dev/null 2>&1; then
    echo "fuzz: $cc cannot link a libFuzzer program (the fuzzer runtime is missing);" \
        "on Debian 12: apt-get install libclang-rt-14-dev" >&2
    exit 2
fi
if [ ! -f "$build/build.ninja" ]; then
    (cd "$root" && CC="$cc" meson setup "$build" -Dfuzz=true -Db_sanitize=address,undefined \
        -Db_lundef=false >/dev/null)
fi
exes=""
for t in $targets; do exes="$exes fuzz/fuzz_$t"; done
# shellcheck disable=SC2086
ninja -C "$build" $exes >/dev/null

scratch=$(mktemp -d "${TMPDIR:-/tmp}/fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# Runs one target; writes its summary line to $scratch/<t>.line, returns its
# status.
run_one() {
    local t=$1
    local exe="$build/fuzz/fuzz_$t" dir="$scratch/$t" art="$build/fuzz-artifacts/$t"
    local dict=() rc=0 tm wall user sys execs cov ft units
    mkdir -p "$dir/corpus" "$art" "$root/fuzz/corpus/$t"
    cp "$root/fuzz/corpus/$t/." "$dir/corpus/" -r 2>/dev/null || true
    [ -f "$root/fuzz/$t.dict" ] && dict=("-dict=$root/fuzz/$t.dict")
    TIMEFORMAT='%R %U %S'
    # shellcheck disable=SC2086
    { time ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:${ASAN_OPTIONS:-} \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-} \
        nice -n "${FUZZ_NICE:-10}" "$exe" "${dict[@]}" -max_total_time="$secs" \
        -timeout="${FUZZ_TIMEOUT:-30}" -rss_limit_mb="${FUZZ_RSS_MB:-2048}" \
        -print_final_stats=1 -artifact_prefix="$art/" ${FUZZ_ARGS:-} \
        "$dir/corpus" >"$dir/log" 2>&1 || rc=$?; } 2>"$dir/time"
    tm=$(tail -n 1 "$dir/time")
    read -r wall user sys <<<"$tm"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -n 1)
    cov=$(grep -o 'cov: [0-9]*' "$dir/log" | tail -n 1 | cut -d' ' -f2 || true)
    ft=$(grep -o 'ft: [0-9]*' "$dir/log" | tail -n 1 | cut -d' ' -f2 || true)
    if [ "$rc" -eq 0 ] && [ "${FUZZ_MERGE:-1}" != 0 ]; then
        # edges only (no hit counters): an input is kept for a new branch, not
        # for taking a known one more often, so the checked-in corpus stays small
        ASAN_OPTIONS=detect_leaks=1 "$exe" -merge=1 -use_counters=0 -timeout="${FUZZ_TIMEOUT:-30}" \
            -rss_limit_mb="${FUZZ_RSS_MB:-2048}" "$root/fuzz/corpus/$t" "$dir/corpus" \
            >"$dir/merge.log" 2>&1 || rc=$?
    fi
    units=$(find "$root/fuzz/corpus/$t" -type f | wc -l)
    printf '%-13s %s execs=%s cov=%s ft=%s corpus=%s wall_s=%s cpu_s=%s\n' "$t" \
        "$([ "$rc" -eq 0 ] && echo ok || echo FAIL)" "${execs:-?}" "${cov:-?}" "${ft:-?}" \
        "$units" "$wall" "$(awk -v u="$user" -v s="$sys" 'BEGIN { printf "%.1f", u + s }')" \
        >"$dir.line"
    if [ "$rc" -ne 0 ]; then
        {
            echo "fuzz: $t failed (status $rc); log: $art/log"
            grep -E '^(==[0-9]+==ERROR|SUMMARY|artifact_prefix|Test unit written|.*runtime error)' \
                "$dir/log" | head -n 8
        } >>"$dir.line"
        cp "$dir/log" "$art/log"
    fi
    return "$rc"
}

status=0
jobs=${FUZZ_JOBS:-1}
running=0
pids=()
for t in $targets; do
    run_one "$t" &
    pids+=($!)
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || status=1
        running=$((running - 1))
    fi
done
while [ "$running" -gt 0 ]; do
    wait -n || status=1
    running=$((running - 1))
done
for t in $targets; do
    cat "$scratch/$t.line"
done
if [ -n "${FUZZ_JUNIT:-}" ]; then
    {
        echo '<?xml version="1.0" encoding="utf-8"?>'
        echo '<testsuite name="fuzz">'
        for t in $targets; do
            echo "  <testcase classname=\"fuzz\" name=\"$t\">"
            head -n 1 "$scratch/$t.line" | grep -q ' ok ' ||
                echo "    <failure message=\"fuzz_$t failed\"/>"
            echo '  </testcase>'
        done
        echo '</testsuite>'
    } >"$FUZZ_JUNIT"
fi
exit "$status"
