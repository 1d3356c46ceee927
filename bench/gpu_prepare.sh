#!/usr/bin/env bash
# Build .gpu/ (git-ignored, ~17 MB) here, before a GPU machine call that runs bench/gpu_session.sh: everything
# that run needs and the working tree does not carry. Name it in the call's `carry`: ["".gpu"].
#   .gpu/models/smollm2/  SmolLM2-135M's config.json + tokenizer files, NO weights: the 93 MB weight file cannot
#                         travel (64 MiB per call), so the GPU benches load `random:.gpu/models/smollm2` — the real
#                         shapes and tokenizer with seeded random weights (timings only).
#   .gpu/data/            the three bench tasks' JSONL files and manifest.json from ../shared/data (or $C2I_DATA),
#                         which does not travel either.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${C2I_DATA:-../shared/data}
TASKS=${C2I_GPU_TASKS:-"fever counterfact bigbench_epistemic_reasoning"}
rm -rf .gpu.tmp
mkdir -p .gpu.tmp/data
HF_HUB_OFFLINE=1 "$PY" -c "from c2i_fast.models import save_architecture; save_architecture('smollm2', '.gpu.tmp/models/smollm2')"
cp "$DATA/manifest.json" .gpu.tmp/data/
for t in $TASKS; do cp "$DATA/$t.jsonl" .gpu.tmp/data/; done
rm -rf .gpu
mv .gpu.tmp .gpu
du -sh .gpu
