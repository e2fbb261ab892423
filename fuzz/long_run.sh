#!/usr/bin/env bash
# The long run: each target in turn, one worker, until N executions (default 10
# million) or its time cap. Run from anywhere; logs go to $LOG_DIR (default
# fuzz/target/long-run). Builds without a sanitizer (faster), with debug assertions
# (overflow checks) on. Usage: fuzz/long_run.sh [target:cap_seconds[:runs] ...]
set -uo pipefail
cd "$(dirname "$0")"
RUNS="${RUNS:-10000000}"
LOG_DIR="${LOG_DIR:-target/long-run}"
mkdir -p "$LOG_DIR"
cargo +nightly fuzz build -a -s none --target-dir target/nosan >"$LOG_DIR/build.log" 2>&1 || exit 1
BIN=target/nosan/x86_64-unknown-linux-gnu/release
TARGETS=("${@:-annotations:420 ir_text:720 plugin_compile:720 safetensors:1380}")
for spec in ${TARGETS[@]}; do
    IFS=: read -r t cap runs <<<"$spec"
    runs="${runs:-$RUNS}"
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "$(date -u +%FT%TZ) start $t (cap ${cap}s, $runs runs)" >>"$LOG_DIR/summary.txt"
    dict=()
    if [ -f "dicts/$t.dict" ]; then dict=("-dict=dicts/$t.dict"); fi
    "$BIN/$t" "corpus/$t" "seeds/$t" -runs="$runs" -max_total_time="$cap" -timeout=10 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" "${dict[@]}" >"$LOG_DIR/$t.log" 2>&1
    rc=$?
    echo "$(date -u +%FT%TZ) end $t rc=$rc $(grep -E 'stat::number_of_executed_units|Done [0-9]+ runs' "$LOG_DIR/$t.log" | tr '\n' ' ')" >>"$LOG_DIR/summary.txt"
done
