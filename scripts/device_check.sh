#!/usr/bin/env bash
# The GPU checks, run on an SM90 GPU (the H200, earlier the H100) through the device tool:
#   device run: bash scripts/device_check.sh [STEP ...]     (default: tests sanitize bench)
# with carry=[".whl"], where .whl holds the wheels the device machine lacks (scripts/fetch_device_wheels.sh gets them):
#   nvidia-cutlass==4.2.0.0, nvidia-cuda-cccl==13.0.85 (every step: the kernel build), and for the
#   humming column humming-kernels==0.1.19 + packaging (bench, bench-full, bench-120b, host, ncu).
#   The portable kernel (tests, sanitize, fallback) uses the Triton that ships with the machine's torch.
# Steps: tests sanitize example tune tuning-test | bench (quick, with humming) bench-full (gpt-oss-20b,
# every M) bench-120b | host | moe-host (mxfp4.moe's eager host us, T = 1, 8, 64, vs <= 60) | fallback | moe (MOE_ARGS)
# | fp8 (W4A8 vs W4A16, torch FP8, bf16, humming FP8; accuracy table; FP8_ARGS overrides its arguments) | ncu
# (NCU_MODELS, NCU_ARGS) | ncu-prefill (issue 24: the prefill paths under Nsight, tensor pipes; NCU_PREFILL_ARGS)
# | ncu-stalls (one prefill kernel's warp stalls per SASS instruction; NCU_STALLS_ARGS) | waits (which side of the pipeline waits; WAITS_ARGS)
# | pdl (programmatic dependent launch off vs on: bench fp8 at M = 1, 16 and bench moe at T = 1, 8, 64)
# | e2e | portable-host (mxfp4.moe's eager host us on the forced portable path, T = 1, 8, replay on and off)
# | portable-e2e (gpt-oss-20b decode B = 1 eager on the forced portable path, beside bf16 experts)
# | timeline (mxfp4.moe's kernels and the gaps between them at T = 1, 2, 8; TIMELINE_ARGS)
# | few-experts (the layer's 4- and 8-expert entries at M = 1 swept into a table copy, bench moe T = 1, 2, 8 with and
# without it; the table lands in $OUT).
# One device call runs for at most 10 minutes: run bench-full, bench-120b, fp8, ncu, each e2e model and
# portable-e2e in a call of their own.
# e2e: E2E_MODELS (default gpt-oss-20b; or gpt-oss-120b: one model per call), E2E_ARGS (replaces the model's
# default bench flags, see e2e_args), E2E_TIMEOUT (seconds per model, default 450: the bench's --budget is 30 s
# less, so it ends itself with its table), E2E_KEEP=1 keeps the checkpoint. The checkpoint goes to the larger of
# /dev/shm and /tmp, its shards spilling into the other (linked); the 120b runs the most layers that fit
# (--layers fit) and, when that is not all 36, says so and extrapolates. Its log and JSON go straight to
# $OUT/e2e-MODEL.txt and $OUT/e2e-MODEL/bench_e2e.json (rewritten after every point): a killed call keeps them.
# Results and logs land in $LOGS, packed into $OUT/logs.tgz; $OUT also gets summary.txt (each step's
# table) and the benchmark PNGs (the device tool brings back at most 8 files). A summary prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
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
# Without the CUTLASS headers no kernel builds and every step would fail after minutes: stop here instead.
python3 -c "import sys; from codegen.build.toolchain import find_cutlass_include as f; sys.exit(f() is None)" || {
  echo "device_check: no nvidia-cutlass on this machine and none carried: run scripts/fetch_device_wheels.sh where"
  echo "the package registries are reachable, then call the device tool with carry=[\".whl\"]"; exit 1; }
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}  # humming's JIT needs it
export HOPPER_MXFP4_CACHE=${HOPPER_MXFP4_CACHE:-/tmp/hopper-mxfp4-cache}
summary=()
note() { summary+=("$1"); }
# DEVICE_BUDGET (seconds, e.g. 570 under the device tool's 600 s call limit): every step's timeout is cut to what
# is left, and a step that would get under 40 s is skipped, so the summary and logs.tgz always come back.
# (At least 1: `timeout 0` would mean no limit at all.)
limit() { local left=$(( ${DEVICE_BUDGET:-1000000} - SECONDS - 20 )); left=$(( left < 1 ? 1 : left )); echo $(( $1 < left ? $1 : left )); }
# table LOG TITLE: the step's table (from the line starting "device:" on) goes into summary.txt.
table() { { echo "== $2"; sed -n '/^device:/,$p' "$1"; echo; } >> "$LOGS/summary.txt"; }
bench() { timeout "$(limit "$1")" python3 -m codegen bench "${@:2}"; }

# seed_table DIR: this GPU's table name (e.g. h200.json), after copying the shipped one into DIR unless DIR has it.
seed_table() {
  local name
  name=$(python3 -c "import torch; from codegen.tune.tables import gpu_family; print(gpu_family(torch.cuda.get_device_name()))").json
  [ ! -f "$1/$name" ] && [ -f "generated/tuning/$name" ] && cp "generated/tuning/$name" "$1/$name"
  echo "$name"
}

finish() {
  cp "$LOGS/summary.txt" "$OUT/summary.txt" 2>/dev/null
  tar czf "$OUT/logs.tgz" -C "$LOGS" .
  echo; echo "== device_check summary =="; printf '%s\n' "${summary[@]}"
  echo "(tables: summary.txt; everything: logs.tgz)"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$LOGS/gpu.txt"
python3 -m codegen doctor 2>&1 | tee "$LOGS/doctor.txt"
python3 -c "import humming; print('humming', humming.__version__)" 2>&1 | tail -n 1 | tee "$LOGS/humming.txt"
note "humming: $(cat "$LOGS/humming.txt")"

# Compile every default config (parallel, disk cache) and print registers / smem / spills / SASS.
python3 -m codegen compile --jobs 12 2>&1 | tee "$LOGS/compile.txt"
note "compile: exit ${PIPESTATUS[0]}"

# Smoke first: small problems of every config the op can pick (both variants), the quantizer, the MoE layer and the
# portable kernel (scripts/sanitize_case.py; the sanitize step adds each config's fused-layer kernels), so a hang
# or a wrong kernel stops the run early.
timeout "$(limit 240)" python3 scripts/sanitize_case.py --cases gemm,quantize,moe,portable 2>&1 | tee "$LOGS/smoke.txt"
smoke=${PIPESTATUS[0]}
note "smoke (small problems of every config, the layer, the portable kernel): exit $smoke: $(grep -E '^sanitize_case: .*(all ok|FAILED)' "$LOGS/smoke.txt" | tail -n 1)"
if [ "$smoke" -ne 0 ]; then finish; exit 1; fi

# ncu_run MODEL PATH: ours' or humming's calls of `bench ncu-case` (NCU_ARGS: e.g. "--projections gate_up,down
# --m 1,16"; default one M=1 gate_up call), exported, then the raw page as CSV (one row per profiled kernel).
ncu_run() {
  local model=$1 path=$2 rep="$LOGS/ncu/$1-$2" extra=()
  [ "$path" = ours ] && extra=(--no-humming)
  # shellcheck disable=SC2086
  timeout "$(limit "${NCU_TIMEOUT:-240}")" ncu --clock-control none --nvtx --nvtx-include "$path/" --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section LaunchStats \
    --section Occupancy --section InstructionStats \
    --metrics smsp__inst_executed.sum,sm__cycles_elapsed.avg.per_second,smsp__inst_executed_op_shared_ld.sum \
    -f --export "$rep" python3 -m codegen bench ncu-case --model "$model" "${extra[@]}" ${NCU_ARGS:-} \
    > "$rep.log" 2>&1
  note "ncu $model $path: exit $?"
  ncu --import "$rep.ncu-rep" --csv --page raw > "$rep.csv" 2>> "$rep.log"
}

# e2e_args MODEL: the e2e step's bench flags for MODEL, sized to end inside E2E_TIMEOUT on an H100 or H200
# (torch.compile's warm-up, about 65 s per batch size for the 20b, dominates; E2E_ARGS replaces these).
e2e_args() {
  case "$1" in
    gpt-oss-120b) echo "--layers fit --batch 1,64 --new-tokens 16 --reps 1 --no-bf16" ;;
    *) echo "--batch 1,64 --new-tokens 16 --reps 2" ;;
  esac
}

# e2e_places: "DIR SPILL": the checkpoint's place (the larger free space of /dev/shm and /tmp) and the other.
e2e_places() {
  local shm tmp
  shm=$(df -B1 --output=avail /dev/shm 2>/dev/null | tail -n 1)
  tmp=$(df -B1 --output=avail /tmp 2>/dev/null | tail -n 1)
  if [ "${shm:-0}" -ge "${tmp:-0}" ]; then
    echo "/dev/shm/hopper-mxfp4-e2e /tmp/hopper-mxfp4-e2e"
  else
    echo "/tmp/hopper-mxfp4-e2e /dev/shm/hopper-mxfp4-e2e"
  fi
}

for step in "${steps[@]}"; do
  if [ "$(limit 40)" -lt 40 ]; then note "$step: skipped, DEVICE_BUDGET=${DEVICE_BUDGET}s is spent"; continue; fi
  case "$step" in
    tests)
      # TESTS_ARGS narrows the run (e.g. "tests/test_gpu_w4a8.py"); TESTS_TIMEOUT raises its limit.
      # shellcheck disable=SC2086
      timeout "$(limit "${TESTS_TIMEOUT:-420}")" python3 -m pytest -q -rs --maxfail=20 -m gpu ${TESTS_ARGS:-tests/} 2>&1 | tee "$LOGS/pytest-gpu.txt"
      note "gpu tests: exit ${PIPESTATUS[0]}: $(tail -n 1 "$LOGS/pytest-gpu.txt")"
      ;;
    sanitize)
      # scripts/sanitize_case.py: every config the op can pick (both variants, both families), the quantizer, the
      # MoE layer as the op runs it, every config's fused-layer epilogue kernels, the portable kernel. Its SM90
      # kernels compile first, in parallel and outside the sanitizer (disk cache). A clean run reads, per tool:
      #   memcheck:  ERROR SUMMARY: 0 errors;  racecheck: RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)
      #   and the script's last line: sanitize_case: N cases, all ok
      # SANITIZE_ARGS splits a long run: "--family bf16" and "--family fp8" (or "--cases ...") in two device calls.
      # shellcheck disable=SC2086
      note "sanitize kernels: $(timeout "$(limit "${SANITIZE_TIMEOUT:-270}")" python3 scripts/sanitize_case.py --compile ${SANITIZE_ARGS:-} 2>&1 | tail -n 1)"
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
        # Host API errors are off: torch and cuda-bindings probe driver entry points with
        # cuGetProcAddress, which returns errors that are not ours; device errors are all reported.
        # shellcheck disable=SC2086
        timeout "$(limit "${SANITIZE_TIMEOUT:-270}")" compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 9 \
          python3 scripts/sanitize_case.py ${SANITIZE_ARGS:-} > "$LOGS/sanitize-$tool.txt" 2>&1
        rc=$?
        verdict="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOGS/sanitize-$tool.txt" | tail -n 1 | sed 's/^=* *//')"
        cases="$(grep -E '^sanitize_case: .*(all ok|FAILED)' "$LOGS/sanitize-$tool.txt" | tail -n 1)"
        verdict="$verdict; ${cases:-no sanitize_case summary: the script stopped early}"
        note "compute-sanitizer $tool${SANITIZE_ARGS:+ ($SANITIZE_ARGS)}: exit $rc: $verdict"
        { echo "== compute-sanitizer $tool ${SANITIZE_ARGS:-}"; grep -E "SUMMARY|FAIL|^sanitize_case: " "$LOGS/sanitize-$tool.txt"; echo; } \
          >> "$LOGS/summary.txt"
        grep -E "FAIL|^sanitize_case: " "$LOGS/sanitize-$tool.txt" | head -n 24
      done
      ;;
    bench)
      bench 360 --quick --out "$LOGS/bench" 2>&1 | tee "$LOGS/bench.txt"
      note "bench --quick (ours, humming, bf16): exit ${PIPESTATUS[0]}"
      table "$LOGS/bench.txt" "bench --quick"; cp "$LOGS/bench/bench_grouped_mm.png" "$OUT/bench-quick.png" 2>/dev/null
      ;;
    grouped)
      # BENCH_ARGS: one or more argument sets of `bench grouped`, separated by ';' (each its own run).
      IFS=';' read -ra sets <<< "${BENCH_ARGS:---quick}"
      for set in "${sets[@]}"; do
        # shellcheck disable=SC2086
        bench "${BENCH_TIMEOUT:-400}" grouped $set --no-plot --out "$LOGS/grouped" 2>&1 | tee -a "$LOGS/grouped.txt"
        note "bench grouped $set: exit ${PIPESTATUS[0]}"
      done
      table "$LOGS/grouped.txt" "bench grouped"
      ;;
    bench-full|bench-120b)
      model=gpt-oss-20b; [ "$step" = bench-120b ] && model=gpt-oss-120b
      bench 540 --model "$model" --out "$LOGS/$step" 2>&1 | tee "$LOGS/$step.txt"
      note "$step ($model, every M, both routings): exit ${PIPESTATUS[0]}"
      table "$LOGS/$step.txt" "$step"; cp "$LOGS/$step/bench_grouped_mm.png" "$OUT/$step.png" 2>/dev/null
      ;;
    host)
      bench 300 host --out "$LOGS/host" 2>&1 | tee "$LOGS/host.txt"
      note "host (us per eager call): exit ${PIPESTATUS[0]}"; table "$LOGS/host.txt" "host"
      ;;
    moe-host)
      # issue 15: eager host us per mxfp4.moe call at T = 1, 8, 64 (graph replay on and off), target <= 60 us;
      # then the same host path on this machine's CPU with the device stubbed (us, torch ops, launches per call).
      bench "${MOE_HOST_TIMEOUT:-240}" host --moe-only --no-humming --out "$LOGS/moe-host" 2>&1 | tee "$LOGS/moe-host.txt"
      note "moe-host: exit ${PIPESTATUS[0]}: $(grep -c ' met' "$LOGS/moe-host.txt") met, $(grep -c 'MISSED' "$LOGS/moe-host.txt") MISSED"
      table "$LOGS/moe-host.txt" "moe-host"
      if [ "${MOE_HOST_CPU:-1}" != 0 ]; then  # MOE_HOST_CPU=0 leaves out the CPU stand-in (it needs no GPU)
        bench 120 host-cpu 2>&1 | tee "$LOGS/moe-host-cpu.txt"
        { echo "== moe-host-cpu"; cat "$LOGS/moe-host-cpu.txt"; echo; } >> "$LOGS/summary.txt"
      fi
      ;;
    portable-host)
      # issue 22: the portable layer's eager host us per mxfp4.moe call (gpt-oss-20b layer, paired gate_up, biases),
      # graph replay on and off ("same bits" checked), behind torch.cuda._sleep; about a minute after the preamble.
      # 30 calls: without replay a call enqueues ~25 kernels, and the launch queue holds about 1000.
      HOPPER_MXFP4_FORCE_PORTABLE=1 bench "${PORTABLE_HOST_TIMEOUT:-240}" host --moe-only --no-humming --no-graph \
        --tokens "${PORTABLE_HOST_TOKENS:-1,8}" --calls 30 --out "$LOGS/portable-host" 2>&1 | tee "$LOGS/portable-host.txt"
      note "portable-host (HOPPER_MXFP4_FORCE_PORTABLE=1): exit ${PIPESTATUS[0]}; failed captures: $(grep -c 'capturing the portable layer as a CUDA graph failed' "$LOGS/portable-host.txt")"
      table "$LOGS/portable-host.txt" "portable-host (HOPPER_MXFP4_FORCE_PORTABLE=1: the mxfp4.moe rows are the portable path)"
      ;;
    portable-e2e)
      # issue 22: gpt-oss-20b through load_gpt_oss, decode B = 1 eager, with the portable path forced (the mxfp4
      # rows), beside transformers' bf16 grouped_mm experts (torch: the variable does not touch them). It reuses the
      # e2e step's checkpoint when that step ran first with E2E_KEEP=1.
      read -r e2e_dir e2e_spill <<< "$(e2e_places)"
      limit=$(limit "${PORTABLE_E2E_TIMEOUT:-300}")
      export TQDM_MININTERVAL=10
      HOPPER_MXFP4_FORCE_PORTABLE=1 timeout -k 20 "$limit" python3 -m codegen bench e2e --model gpt-oss-20b \
        --dir "$e2e_dir" --spill-dir "$e2e_spill" --budget $((limit - 30)) --modes eager \
        --batch "${PORTABLE_E2E_BATCH:-1}" --new-tokens 16 --reps 1 --out "$OUT/portable-e2e" 2>&1 | tee "$LOGS/portable-e2e.txt"
      note "portable-e2e (HOPPER_MXFP4_FORCE_PORTABLE=1, checkpoint under $e2e_dir): exit ${PIPESTATUS[0]}; failed captures: $(grep -c 'capturing the portable layer as a CUDA graph failed' "$LOGS/portable-e2e.txt")"
      table "$LOGS/portable-e2e.txt" "portable-e2e (HOPPER_MXFP4_FORCE_PORTABLE=1: the mxfp4 rows are the portable path)"
      grep -E "^e2e \[.*(loaded|decode)" "$LOGS/portable-e2e.txt" >> "$LOGS/summary.txt"
      [ "${E2E_KEEP:-0}" = 1 ] || rm -rf "${e2e_dir:?}/gpt-oss-20b" "${e2e_spill:?}/gpt-oss-20b"
      ;;
    fallback)
      # FALLBACK_ARGS adds flags (e.g. "--portable-sweep", "--routing both", "--model-path DIR").
      # shellcheck disable=SC2086
      HOPPER_MXFP4_FORCE_PORTABLE=1 bench "${FALLBACK_TIMEOUT:-540}" fallback --routing uniform ${FALLBACK_ARGS:-} --out "$LOGS/fallback" 2>&1 \
        | tee "$LOGS/fallback.txt"
      note "fallback (portable forced: kernel, cached copy, bf16, sm90): exit ${PIPESTATUS[0]}"; table "$LOGS/fallback.txt" "fallback"
      ;;
    pdl)
      # Programmatic dependent launch (codegen/runtime/dependent_launch.py, HOPPER_MXFP4_PDL) off and on, in
      # alternation, two rounds (drift shows as a difference between the two runs of one setting): the W4A8 pair
      # (quantizer, then GEMM) and W4A16 at decode M (bench fp8), the layer at small T (bench moe: graph replay,
      # eager, host us). PDL_FP8_ARGS / PDL_MOE_ARGS override the arguments, PDL_ROUNDS the rounds.
      for round in $(seq 1 "${PDL_ROUNDS:-2}"); do
        for setting in 0 1; do
          tag="pdl$setting-round$round"
          # shellcheck disable=SC2086
          HOPPER_MXFP4_PDL=$setting bench 150 fp8 ${PDL_FP8_ARGS:---model gpt-oss-20b --routing uniform --m 1,16 --no-humming --no-plot} \
            --out "$LOGS/$tag-fp8" 2>&1 | tee "$LOGS/$tag-fp8.txt"
          note "pdl fp8, HOPPER_MXFP4_PDL=$setting, round $round: exit ${PIPESTATUS[0]}"
          table "$LOGS/$tag-fp8.txt" "pdl fp8, HOPPER_MXFP4_PDL=$setting, round $round"
          # shellcheck disable=SC2086
          HOPPER_MXFP4_PDL=$setting bench 150 moe ${PDL_MOE_ARGS:---tokens 1,8,64 --routing uniform --no-plot} \
            --out "$LOGS/$tag-moe" 2>&1 | tee "$LOGS/$tag-moe.txt"
          note "pdl moe, HOPPER_MXFP4_PDL=$setting, round $round: exit ${PIPESTATUS[0]}"
          table "$LOGS/$tag-moe.txt" "pdl moe, HOPPER_MXFP4_PDL=$setting, round $round"
        done
      done
      ;;
    moe)
      # MOE_ARGS: the bench's arguments (default: its own T list, both routings).
      # shellcheck disable=SC2086
      bench 420 moe ${MOE_ARGS:-} --out "$LOGS/moe" 2>&1 | tee "$LOGS/moe.txt"
      note "moe layer: exit ${PIPESTATUS[0]}"; table "$LOGS/moe.txt" "moe"
      ;;
    timeline)
      # Issue 21: where mxfp4.moe's time goes at small T: each kernel's GPU time and the gap before it in a CUDA-graph
      # replay, from the CUDA profiler's trace, bf16 and FP8 layers. TIMELINE_ARGS overrides (e.g. "--tokens 1
      # --model gpt-oss-120b"; default T = 1, 2, 8, gpt-oss-20b, uniform).
      # shellcheck disable=SC2086
      bench 240 timeline ${TIMELINE_ARGS:-} --out "$LOGS/timeline" 2>&1 | tee "$LOGS/timeline.txt"
      note "timeline (the layer's kernels and gaps): exit ${PIPESTATUS[0]}"; table "$LOGS/timeline.txt" "timeline"
      ;;
    few-experts)
      # The MoE layer's few-experts entries for this GPU (issue 21): at T = 1 and 2 a top-4 layer reads at most 4 and 8
      # experts, and takes the table's entry for that many experts at M = 1 (codegen.tune.selection, rows=). Sweeps
      # them (W4A16 at 4 and 8 experts, W4A8 at 4) into a copy of the shipped table, then times the layer (bench moe,
      # T = 1, 2, 8) with the shipped table and with the copy, alternating, two rounds. $OUT/<family>.json replaces
      # generated/tuning/<family>.json. (On a GPU whose shipped table has them already, both sides are the same.)
      dir=${TUNE_DIR:-$LOGS/few-experts}
      mkdir -p "$dir" "$LOGS/shipped-only"
      table=$(seed_table "$dir")
      few_shapes="--shape 4,5760,2880 --shape 4,2880,2880"
      # shellcheck disable=SC2086
      timeout "$(limit 200)" python3 -m codegen tune $few_shapes --shape 8,5760,2880 --shape 8,2880,2880 --m 1 --quick \
        --no-plot --out "$dir/$table" 2>&1 | tee "$LOGS/few-experts-tune.txt"
      note "few-experts tune (W4A16): exit ${PIPESTATUS[0]}"
      # shellcheck disable=SC2086
      timeout "$(limit 150)" python3 -m codegen tune $few_shapes --activations fp8 --m 1 --quick --no-plot \
        --out "$dir/$table" 2>&1 | tee -a "$LOGS/few-experts-tune.txt"
      note "few-experts tune (W4A8): exit ${PIPESTATUS[0]}"
      { echo "== few-experts tune"; grep -E "^(shape|-----|E=)" "$LOGS/few-experts-tune.txt"; echo; } >> "$LOGS/summary.txt"
      cp "$dir/$table" "$OUT/$table"
      for round in 1 2; do
        for tables in "$LOGS/shipped-only" "$dir"; do
          echo "== bench moe, round $round, HOPPER_MXFP4_TUNING_DIR=$tables" | tee -a "$LOGS/few-experts-moe.txt"
          HOPPER_MXFP4_TUNING_DIR=$tables bench 120 moe --tokens 1,2,8 --routing uniform --no-plot \
            --out "$LOGS/few-experts-moe-$round" 2>&1 | tee -a "$LOGS/few-experts-moe.txt"
        done
      done
      note "few-experts bench moe (shipped table vs the swept copy, two rounds): done"
      table "$LOGS/few-experts-moe.txt" "few-experts bench moe (rounds in order: shipped, swept, shipped, swept)"
      ;;
    e2e)
      read -r e2e_dir e2e_spill <<< "$(e2e_places)"
      { df -h /dev/shm /tmp; free -g; } 2>&1 | tee "$LOGS/e2e-room.txt"
      export TQDM_MININTERVAL=10  # progress bars every 10 s, not a log full of them
      for model in ${E2E_MODELS:-gpt-oss-20b}; do
        limit=$(limit "${E2E_TIMEOUT:-450}")
        # SIGTERM at the limit (the bench then writes its table), SIGKILL 20 s later.
        # shellcheck disable=SC2046,SC2086
        timeout -k 20 "$limit" python3 -m codegen bench e2e --model "$model" --dir "$e2e_dir" --spill-dir "$e2e_spill" \
          --budget $((limit - 30)) --out "$OUT/e2e-$model" ${E2E_ARGS:-$(e2e_args "$model")} 2>&1 | tee "$OUT/e2e-$model.txt"
        note "e2e $model (checkpoint under $e2e_dir, spill $e2e_spill): exit ${PIPESTATUS[0]}"
        cp "$OUT/e2e-$model.txt" "$LOGS/"; table "$OUT/e2e-$model.txt" "e2e $model"
        grep -E "^e2e \[.*(written|loaded|decode|error|stopped)" "$OUT/e2e-$model.txt" >> "$LOGS/summary.txt"
        [ "${E2E_KEEP:-0}" = 1 ] || rm -rf "${e2e_dir:?}/$model" "${e2e_spill:?}/$model"  # room for the next model
      done
      ;;
    fp8)
      # FP8_ARGS overrides (e.g. "--model gpt-oss-120b"); the default is both models, uniform routing, every M.
      # shellcheck disable=SC2086
      bench "${FP8_TIMEOUT:-560}" fp8 ${FP8_ARGS:---routing uniform} --out "$LOGS/fp8" 2>&1 | tee "$LOGS/fp8.txt"
      note "fp8 (W4A8 vs W4A16, torch._scaled_grouped_mm, bf16, humming fp8; accuracy): exit ${PIPESTATUS[0]}"
      table "$LOGS/fp8.txt" "fp8"; cp "$LOGS/fp8/bench_fp8.json" "$OUT/bench_fp8.json" 2>/dev/null
      ;;
    ncu)
      mkdir -p "$LOGS/ncu"
      models=${NCU_MODELS:-gpt-oss-20b gpt-oss-120b}
      args=()
      for model in $models; do for path in ours humming; do
        ncu_run "$model" "$path"; args+=("${path} ${model#gpt-oss-}=$LOGS/ncu/$model-$path.csv")
      done; done
      python3 scripts/ncu_summary.py "${args[@]}" 2>&1 | tee "$LOGS/ncu-summary.txt"
      { echo "== ncu (${NCU_ARGS:-M=1 gate_up})"; cat "$LOGS/ncu-summary.txt"; echo; } >> "$LOGS/summary.txt"
      ;;
    ncu-prefill)
      # Issue 24: Nsight Compute on the prefill paths, per projection and M in this order: W4A16, W4A8, torch FP8,
      # torch bf16, humming FP8 (bench ncu-case --prefill; the order file names each profiled call), with the tensor
      # pipes' utilization (ComputeWorkloadAnalysis) beside issue busy and the stalls.
      mkdir -p "$LOGS/ncu"
      rep="$LOGS/ncu/prefill"
      # shellcheck disable=SC2086
      timeout "$(limit "${NCU_TIMEOUT:-400}")" ncu --clock-control none --nvtx --nvtx-include "prefill/" \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
        --section LaunchStats --section InstructionStats --metrics smsp__inst_executed.sum,sm__cycles_elapsed.avg.per_second,lts__t_bytes.sum.per_second,smsp__inst_executed_op_global_st.sum,l1tex__t_requests_pipe_lsu_mem_global_op_st.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum \
        -f --export "$rep" python3 -m codegen bench ncu-case --prefill \
        ${NCU_PREFILL_ARGS:---model gpt-oss-20b --projections gate_up,down --m 1024,4096} > "$rep.log" 2>&1
      note "ncu-prefill: exit $?: $(grep -c ': profiled ' "$rep.log") calls profiled"
      ncu --import "$rep.ncu-rep" --csv --page raw > "$rep.csv" 2>> "$rep.log"
      grep "^ncu-case:" "$rep.log" > "$LOGS/ncu-prefill-order.txt"
      python3 scripts/ncu_summary.py "prefill=$rep.csv" > "$LOGS/ncu-prefill-summary.txt" 2>&1
      cat "$LOGS/ncu-prefill-order.txt" "$LOGS/ncu-prefill-summary.txt"
      { echo "== ncu prefill"; cat "$LOGS/ncu-prefill-order.txt" "$LOGS/ncu-prefill-summary.txt"; echo; } >> "$LOGS/summary.txt"
      ;;
    ncu-stalls)
      # Issue 24: where one prefill kernel's warps stall, instruction by instruction (SourceCounters' warp-state
      # sampling on the SASS; scripts/ncu_stall_lines.py lists the top instructions and the samples by opcode).
      # NCU_STALLS_ARGS picks the case (default: W4A8 gate_up M = 4096, the shipped prefill config).
      mkdir -p "$LOGS/ncu"
      rep="$LOGS/ncu/stalls"
      # shellcheck disable=SC2086
      timeout "$(limit "${NCU_TIMEOUT:-300}")" ncu --clock-control none --nvtx --nvtx-include "prefill/" \
        --section SourceCounters --section WarpStateStats -f --export "$rep" python3 -m codegen bench ncu-case --prefill \
        ${NCU_STALLS_ARGS:---model gpt-oss-20b --projections gate_up --m 4096 --no-humming --configs n128_m256_k128_s5_wg2_fp8} \
        > "$rep.log" 2>&1
      note "ncu-stalls: exit $?: $(grep -c ': profiled ' "$rep.log") calls profiled"
      ncu --import "$rep.ncu-rep" --page source --csv --print-source sass > "$rep-sass.csv" 2>> "$rep.log"
      python3 scripts/ncu_stall_lines.py "$rep-sass.csv" > "$LOGS/ncu-stalls.txt" 2>&1
      head -n 60 "$LOGS/ncu-stalls.txt"
      { echo "== ncu stalls"; grep "^ncu-case:" "$rep.log"; cat "$LOGS/ncu-stalls.txt"; echo; } >> "$LOGS/summary.txt"
      ;;
    waits)
      # Issue 21: which side of the pipeline waits (the wait-probe build of the op's configs) and the shipped build
      # against its copy roof (the copy-only build: the loads alone), 20b gate_up + down.
      # shellcheck disable=SC2086
      bench "${WAITS_TIMEOUT:-240}" waits ${WAITS_ARGS:---model gpt-oss-20b --projections gate_up,down --m 1,16} 2>&1 \
        | tee "$LOGS/waits.txt"
      note "waits (producer vs consumer waits): exit ${PIPESTATUS[0]}"; table "$LOGS/waits.txt" "waits"
      ;;
    example)
      # The README's main job: generate + compile the default kernels, then the op on an example.
      python3 -m codegen generate --out "$LOGS/generated" > /dev/null \
        && python3 examples/run_example.py 2>&1 | tee "$LOGS/example.txt"
      note "example (README main job): exit ${PIPESTATUS[0]}: $(tail -n 1 "$LOGS/example.txt")"
      ;;
    tuning-test)
      timeout "$(limit 120)" python3 -m pytest -q -rs tests/test_tuning_gpu.py 2>&1 | tee "$LOGS/pytest-tuning-gpu.txt"
      note "tuning GPU tests: exit ${PIPESTATUS[0]}: $(tail -n 1 "$LOGS/pytest-tuning-gpu.txt")"
      ;;
    tune)
      # The sweep merges into the GPU's shipped table (generated/tuning/<family>.json, e.g. h200.json),
      # so one file ends up with every model's entries; the table lands in $OUT (its progress log in logs.tgz).
      # TUNE_ARGS overrides the sweep (e.g. "--model gpt-oss-120b --quick --m 1,16"); TUNE_TIMEOUT its seconds.
      # TUNE_DIR (default: this call's log folder) holds the table and its progress log: with a fixed folder
      # (TUNE_DIR=/tmp/tune) a later call on the same warm machine merges into that table and resumes what a
      # call cut short by its timeout measured (add --no-resume to TUNE_ARGS to measure all again).
      # Issue 21's routing-robust sweep: every candidate under uniform loads and under the benchmarks' Zipf loads
      # of the same rows (--routing both); an entry takes the config whose worse ratio to the best time of either
      # routing is smallest, and must beat the default's by > 2 % (codegen/tune/choice.py). The M = 16, 64, 256
      # buckets, one model per call (--quick: 884 measurements a model, about 3-4 min for 20b, 5-8 for 120b):
      #   TUNE_DIR=/tmp/tune TUNE_TIMEOUT=540 DEVICE_BUDGET=580 \
      #     TUNE_ARGS="--model gpt-oss-20b --quick --m 16,64,256 --routing both" bash scripts/device_check.sh tune
      #   (the same with --model gpt-oss-120b; rerun it unchanged if its timeout cut it short: it resumes)
      # on the H100, then on the H200; $OUT/<family>.json replaces generated/tuning/<family>.json, and the summary
      # gives per (shape, M) the Zipf / uniform slowdown of the chosen config (issue 21's target: <= 1.2x).
      dir=${TUNE_DIR:-$LOGS/tune}
      mkdir -p "$dir"
      table=$(seed_table "$dir")
      # shellcheck disable=SC2086
      timeout "$(limit "${TUNE_TIMEOUT:-400}")" python3 -m codegen tune ${TUNE_ARGS:---model gpt-oss-20b --quick --m 1,16,256,4096} \
        --out "$dir/$table" 2>&1 | tee "$LOGS/tune.txt"
      note "tune ($table): exit ${PIPESTATUS[0]}"
      { echo "== tune"; sed -n '/^shape /,$p' "$LOGS/tune.txt"; echo; } >> "$LOGS/summary.txt"  # its summary table
      mkdir -p "$LOGS/tune" && cp "$dir/${table%.json}".* "$LOGS/tune/" 2>/dev/null
      cp "$dir/$table" "$OUT/$table"
      export HOPPER_MXFP4_TUNING_DIR="$dir"  # the later steps of this run use the fresh table
      ;;
    *) echo "unknown step $step"; finish; exit 2 ;;
  esac
done
finish
