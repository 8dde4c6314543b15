#!/usr/bin/env bash
# Every GPU check the open issues wait for, in one short run on the device machine (issues 3, 4, 7).
#
# Here, once:   bash ../shared/tools/device-wheels.sh        # fills .whl (diffusers, cache-dit)
# Then:         run(command="bash bench/gpu_checks.sh", carry=[".whl"], timeout_s=590)
#
# Each stage has its own time limit so that one slow stage cannot eat the others; results (JSON,
# markdown, logs) go to $OUT/results, to be copied into bench/results/ here. Stages, cheapest first:
#   1. GPU kernel tests (compiled Triton, not the interpreter)              issue 4
#   2. bench/kernels.py: Sage attention and FP8 quantization tables, and    issue 4
#      the attention kernel's tile/warp/stage sweep at S=4608 (--sweep)
#   3. bench/gpu_rates.py: GEMM and SDPA rates for bench/cp.py's model      issue 7
#   4. bench/speed.py --device cuda: FLUX.1-dev shape, 3 rounds             issue 3
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT/results"
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor-cache-gpu
# Compiled Triton, never the interpreter: tests/kernels/conftest.py sets TRITON_INTERPRET=1 unless
# it is set, and then every GPU test would be skipped (and the stage would still pass).
export TRITON_INTERPRET=0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site .whl/*.whl
  export PYTHONPATH=$PWD/.site:$PWD
else
  export PYTHONPATH=$PWD
  echo "no .whl: diffusers and cache-dit are missing, stage 4 will fail (run ../shared/tools/device-wheels.sh here first)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/results/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

stage() {  # stage NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/results/$name.log" 2>&1
  echo "== $name: rc=$? in $((SECONDS - t0)) s (limit $limit s)"
  tail -n 25 "$OUT/results/$name.log"
}

# Limits sum to 535 s, under the 600 s a call may run; speed.py leaves speed_cuda.partial.{json,md}
# after each timed round, so a run cut short still reports the rounds it finished.
# -rs lists any skipped test with its reason: a skip here means a check did not run.
stage kernel_tests 75 python3 -m pytest -q -rs -p no:cacheprovider tests/kernels/test_kernels_gpu.py
stage kernels 130 python3 bench/kernels.py --rep-ms 200 --warmup-ms 50 --sweep 4608 --out "$OUT/results"
stage gpu_rates 30 python3 bench/gpu_rates.py --json "$OUT/results/gpu_rates.json"
stage speed 300 python3 bench/speed.py --device cuda --repeats 3 --out "$OUT/results/speed_cuda"
ls -la "$OUT/results"
