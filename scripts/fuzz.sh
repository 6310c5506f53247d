#!/usr/bin/env bash
# Builds the engine's libFuzzer target and runs it for SECONDS (default 60).
# Crashes land in fuzz/artifacts/ (exit status 1); the corpus grows in fuzz/.corpus-work/
# (seeds in fuzz/corpus/). Every crash found so far is a regression test under
# Tests/KeyholeEngineTests/Fixtures/fuzz-regressions/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-60}
# The Swift runtime's interactive backtracer would hold the pipes open after a crash.
export SWIFT_BACKTRACE=enable=no
# Optimised (with ASan): about ten times the executions per second of a debug build.
# A failed build stops here (an older binary must never be fuzzed in its place).
build_status=0
swift build -c release --product RewriterFuzzer -Xswiftc -sanitize=fuzzer,address -Xswiftc -parse-as-library \
  --scratch-path .build-fuzz > .last-build.log 2>&1 || build_status=$?
grep -vE "Cannot export local symbol|^\[" .last-build.log || true
if [ "$build_status" -ne 0 ]; then
  echo "fuzz build failed (status $build_status): fuzz/.last-build.log" >&2
  exit 1
fi
test -x .build-fuzz/release/RewriterFuzzer
mkdir -p .corpus-work artifacts
status=0
timeout --kill-after=10 $((seconds + 120)) ./.build-fuzz/release/RewriterFuzzer -max_total_time="$seconds" -timeout=10 \
  -rss_limit_mb=2048 -artifact_prefix=artifacts/ -print_final_stats=1 .corpus-work corpus > .last-run.log 2>&1 || status=$?
grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|Done)|ERROR|Fatal error|precondition" .last-run.log | head -n 20
if [ "$status" -ne 0 ]; then
  echo "fuzzer failed (status $status); crashing input: $(ls -t artifacts/ | head -n 1)" >&2
  exit 1
fi
