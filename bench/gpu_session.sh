#!/usr/bin/env bash
# One prepared run for the GPU machine (device time is scarce: 15 min a session, machine start included), in
# order of what matters most, each step under the time left of one budget, every result written to $OUT:
#   1. versions, nvidia-smi                          → $OUT/env.txt
#   2. the Triton kernel tests on CUDA tensors, and the factored model through them → session.log (pytest)
#   3. the search bench on FEVER (a, b, c; random weights of SmolLM2's shapes)  → $OUT/search-gpu-fever.json
#   4. the kernel bench, --quick (JSON rewritten after every case)            → $OUT/kernels-gpu-quick.json
#   5. the factored-forward bench (bf16, batch 8 × 512)                       → $OUT/factored_forward-gpu.json
#   6. the search bench on CounterFact and epistemic reasoning, if time is left → $OUT/search-gpu-<task>.json
# Here first:  bash bench/gpu_prepare.sh      (builds .gpu/: model config + tokenizer, the task files)
# Then the device call:  run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=560)
# Rehearse it on this CPU at toy sizes (every step, same commands, minutes):
#   C2I_GPU_REHEARSAL=1 OUT=/tmp/gpu-out PY=.venv/bin/python bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/c2i-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
# a relative interpreter path (PY=.venv/bin/python) must still work from elsewhere: the import check runs in /
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac
REHEARSAL=${C2I_GPU_REHEARSAL:-0}
BUDGET=${C2I_GPU_BUDGET_S:-500}          # seconds for every step together; the call's timeout_s must exceed it
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false C2I_DATA="$PWD/.gpu/data"
export C2I_CACHE="${C2I_CACHE:-/tmp/c2i-cache}"   # nothing converted or cached travels: prove it
MODEL="random:$PWD/.gpu/models/smollm2"
T0=$SECONDS
exec > >(tee -a "$OUT/session.log") 2>&1
log() { echo "[gpu_session +$((SECONDS - T0))s $(date -u +%H:%M:%S)] $*"; }
step() {   # step NAME CAP_SECONDS CMD...: run CMD under min(CAP, time left); SIGINT first so benches save
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 25 ]; then log "SKIP $name: ${left}s of the budget left"; return 0; fi
  [ "$cap" -gt "$left" ] && cap=$left
  log "START $name (limit ${cap}s): $*"
  timeout --signal=INT --kill-after=20 "$cap" "$@"
  log "END $name rc=$?"
}

[ -d .gpu/models/smollm2 ] && [ -d .gpu/data ] || { log "no .gpu/: run bash bench/gpu_prepare.sh here and carry .gpu"; exit 2; }
if [ "$REHEARSAL" = 1 ]; then
  SEARCH="--samples 8 --test-size 8 --top-k 1 --max-evals 2 --paper-subset 1 --laser-subset 1 --laser-rows 2"
  KBENCH="--tiny"; FF="--batch 1 --seq 16 --repeats 2 --warmup 1 --rounds 1 --dtype float32"
  TESTS="tests/test_kernels_bench.py"
else
  SEARCH="--samples 100 --test-size 500 --top-k 5 --max-evals 48 --paper-subset 8 --laser-subset 4 --laser-rows 100"
  KBENCH="--quick"; FF="--batch 8 --seq 512 --repeats 10 --warmup 3 --rounds 2 --dtype bfloat16"
  TESTS="tests/test_kernels_ops.py tests/test_kernels_rsvd.py tests/test_kernels_compile.py tests/test_kernels_bench.py"
fi

{ date -u; nvidia-smi 2>&1 | head -20; "$PY" -c "import torch, triton, transformers, sys
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__,
      'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "$REHEARSAL" != 1 ]; then   # the machine is bare: install the checkout (its dependencies are all there)
  step install 90 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi
if ! (cd / && "$PY" -c "import c2i_fast.kernels"); then
  # No install: this copy of the checkout is thrown away after the call, so put kernels/ where the package
  # expects it (c2i_fast/kernels) and the checkout on the path — the same modules the install maps.
  log "c2i_fast not importable after the install: falling back to c2i_fast/kernels -> ../kernels + PYTHONPATH"
  ln -sfn ../kernels c2i_fast/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# Triton compiles every kernel specialization at its first launch, one at a time: these tests launch ~300 (208
# distinct on the CPU without bf16), ~0.3-0.5 s each. Spread them over processes where pytest-xdist is there
# (the GPU image has it).
XDIST=""
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n ${C2I_GPU_WORKERS:-8}"; fi
step kernel-tests 130 "$PY" -m pytest -q -p no:cacheprovider --no-header -rs $XDIST $TESTS
# the factored SmolLM2 (random weights) through the compiled kernels vs the torch reference, on CUDA
C2I_TEST_MODEL="$MODEL" step kernels-in-model 60 "$PY" -m pytest -q -p no:cacheprovider --no-header -rs \
  tests/test_kernels_in_model.py -k "logits or copy"
step search-fever 150 "$PY" bench/bench_search.py --model "$MODEL" --task fever $SEARCH --no-laser-selection \
  --seed 0 --out "$OUT/search-gpu-fever.json"
step kernel-bench 120 "$PY" bench/bench_kernels.py $KBENCH --out "$OUT/kernels-gpu-quick.json"
step factored-forward 45 "$PY" bench/bench_factored_forward.py --model "$MODEL" $FF --out "$OUT/factored_forward-gpu.json"
for task in counterfact bigbench_epistemic_reasoning; do
  step "search-$task" 100 "$PY" bench/bench_search.py --model "$MODEL" --task "$task" $SEARCH --no-laser-selection \
    --seed 0 --out "$OUT/search-gpu-$task.json"
done
log "done; files in $OUT:"
ls -la "$OUT"
