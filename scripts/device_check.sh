#!/usr/bin/env bash
# The GPU checks, run on the H100 through the device tool (one call does everything):
#   device run: bash scripts/device_check.sh [tests] [sanitize] [bench] [bench-full] [tune] [example] [tuning-test]
# with carry=[".whl"], where .whl holds the wheels the device machine lacks:
#   nvidia-cutlass==4.2.0.0 and nvidia-cuda-cccl==13.0.85 (see README "Working on the H100").
# Logs and results land in $OUT (or ./device-out when OUT is unset); a summary prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
# Results (bench, tuning table) go to $OUT; logs to $LOGS, packed into $OUT/logs.tgz at the end
# (the device tool brings back at most 8 files).
LOGS=$(mktemp -d)
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests sanitize bench)

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
export HOPPER_MXFP4_CACHE=${HOPPER_MXFP4_CACHE:-/tmp/hopper-mxfp4-cache}
summary=()
note() { summary+=("$1"); }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$LOGS/gpu.txt"
python3 -m codegen doctor 2>&1 | tee "$LOGS/doctor.txt"

# Compile every default config (parallel, disk cache) and print registers / smem / spills / SASS.
python3 -m codegen compile --jobs 12 2>&1 | tee "$LOGS/compile.txt"
note "compile: exit ${PIPESTATUS[0]}"

# Smoke first: one small problem per default config, so a hang or a wrong kernel stops the run early.
timeout 120 python3 scripts/sanitize_case.py 2>&1 | tee "$LOGS/smoke.txt"
smoke=${PIPESTATUS[0]}
note "smoke (one small problem per config): exit $smoke"
if [ "$smoke" -ne 0 ]; then
  echo; echo "== device_check summary =="; printf '%s\n' "${summary[@]}"; exit 1
fi

for step in "${steps[@]}"; do
  case "$step" in
    tests)
      timeout 300 python3 -m pytest -q -rs --maxfail=20 -m gpu tests/ 2>&1 | tee "$LOGS/pytest-gpu.txt"
      note "gpu tests: exit ${PIPESTATUS[0]}: $(tail -n 1 "$LOGS/pytest-gpu.txt")"
      ;;
    sanitize)
      for tool in memcheck racecheck; do
        # Host API errors are off: torch and cuda-bindings probe driver entry points with
        # cuGetProcAddress, which returns errors that are not ours; device errors are all reported.
        timeout 150 compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 9 python3 scripts/sanitize_case.py \
          > "$LOGS/sanitize-$tool.txt" 2>&1
        rc=$?
        note "compute-sanitizer $tool: exit $rc: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOGS/sanitize-$tool.txt" | tail -n 1)"
        grep -E "relative error|FAIL" "$LOGS/sanitize-$tool.txt" | head -n 8
      done
      ;;
    bench)
      timeout 300 python3 benchmarks/bench_grouped_mm.py --quick --out "$OUT" 2>&1 | tee "$LOGS/bench.txt"
      note "bench --quick: exit ${PIPESTATUS[0]}"
      ;;
    bench-full)
      # gpt-oss-20b at every M with all three paths, then gpt-oss-120b at four M values without the
      # portable path (which takes about 0.1 s a call there).
      mkdir -p "$OUT/bench-20b" "$OUT/bench-120b"
      timeout 300 python3 benchmarks/bench_grouped_mm.py --model gpt-oss-20b --out "$OUT/bench-20b" 2>&1 \
        | tee "$OUT/bench-20b/bench.txt"
      note "bench gpt-oss-20b: exit ${PIPESTATUS[0]}"
      timeout 240 python3 benchmarks/bench_grouped_mm.py --model gpt-oss-120b --m 1,16,256,4096 --no-portable \
        --out "$OUT/bench-120b" 2>&1 | tee "$OUT/bench-120b/bench.txt"
      note "bench gpt-oss-120b: exit ${PIPESTATUS[0]}"
      ;;
    example)
      # The README's main job: generate + compile the default kernels, then the op on an example.
      python3 -m codegen generate --out "$LOGS/generated" > /dev/null \
        && python3 examples/run_example.py 2>&1 | tee "$LOGS/example.txt"
      note "example (README main job): exit ${PIPESTATUS[0]}: $(tail -n 1 "$LOGS/example.txt")"
      ;;
    tuning-test)
      timeout 120 python3 -m pytest -q -rs tests/test_tuning_gpu.py 2>&1 | tee "$LOGS/pytest-tuning-gpu.txt"
      note "tuning GPU tests: exit ${PIPESTATUS[0]}: $(tail -n 1 "$LOGS/pytest-tuning-gpu.txt")"
      ;;
    tune)
      # The sweep merges into the shipped table, so one file ends up with every model's entries.
      mkdir -p "$LOGS/tune"
      [ -f generated/tuning/h100.json ] && cp generated/tuning/h100.json "$LOGS/tune/h100.json"
      # TUNE_ARGS overrides the sweep (e.g. "--model gpt-oss-120b --quick --m 1,16"); the table lands in $OUT.
      # shellcheck disable=SC2086
      timeout "${TUNE_TIMEOUT:-400}" python3 -m codegen tune ${TUNE_ARGS:---model gpt-oss-20b --quick --m 1,16,256,4096} \
        --out "$LOGS/tune/h100.json" 2>&1 | tee "$LOGS/tune.txt"
      note "tune: exit ${PIPESTATUS[0]}"
      cp "$LOGS/tune/h100.json" "$OUT/h100.json"
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done

tar czf "$OUT/logs.tgz" -C "$LOGS" .
echo
echo "== device_check summary =="
printf '%s\n' "${summary[@]}"
