#!/usr/bin/env bash
# On a CUDA machine: the model and transformers tests through the Triton kernels, the integration checks
# (training loop with bf16 autocast, DDP and FSDP2 over NCCL when there are 2 GPUs, caches, CUDA graphs), the demo.
# Usage: bash bench/gpu_tests.sh [log dir]
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-/tmp/flashfuse-gpu}
mkdir -p "$log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRITON_INTERPRET=0 FLASHFUSE_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
python -m pytest tests/test_models.py tests/test_more_models.py tests/test_hf.py -q -p no:cacheprovider 2>&1 | tee "$log/models.log"
python scripts/integration.py all --device cuda 2>&1 | tee "$log/integration.log"
python -m flashfuse demo 2>&1 | tee "$log/demo.log"
python bench/models.py --models gpt2-124M llama-gqa-0.5B 2>&1 | tee "$log/models_bench.log"
