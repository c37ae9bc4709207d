#!/usr/bin/env bash
# The GPU checks of docs/benchmarks.md in one device command (random weights, real sizes):
#   1. benchmarks/real_size.py: stage times, peak memory and fp16/bf16 health of sd21 at 512 px;
#   2. g4seg bench: the naive port against the engine (CUDA defaults: 8 classes x 4 images, fp16);
#   3. g4seg bench --compile: compilation (about 160 s on an H200) in the warm-up, 3 timed passes.
# Each step has its own time limit and writes its log and JSON under $OUT, so a step that runs out
# of time still leaves the earlier ones. Prepare the wheels here first (bash
# /work/shared/tools/device-wheels.sh), then, on the device, carry .whl and run
#   bash benchmarks/gpu_checks.sh
# The random SD repo is built in /tmp/sd21 (2.6 GB, too big to carry) and reused by later steps.
set -u
out=${OUT:-/tmp/g4seg-gpu}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_checks: installing the carried wheels failed (run device-wheels.sh and carry .whl)"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import sys, torch, diffusers, transformers, open_clip, pydantic
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__,
      "transformers", transformers.__version__, "open_clip", open_clip.__version__, "pydantic", pydantic.VERSION)'
  nproc
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $out/NAME.log, print its tail and exit code
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
  tail -n 40 "$out/$name.log"
}

step real_size "${REAL_SIZE_SECONDS:-120}" python3 benchmarks/real_size.py --family sd21 --device cuda \
  --dtypes fp32,fp16,bf16 --resolution 512 --classes 3 --repeats 5 --models /tmp/sd21 --out "$out/real_size.json"
step bench "${BENCH_SECONDS:-120}" python3 -m g4seg bench --device cuda --models /tmp/sd21 --json "$out/bench.json"
step bench_compiled "${COMPILED_SECONDS:-330}" python3 -m g4seg bench --device cuda --models /tmp/sd21 --compile \
  --repeats 3 --json "$out/bench_compiled.json"
