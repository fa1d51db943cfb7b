"""On a CUDA machine: compile a tiny left-padded GPT-2 with backend="flashfuse" (inductor) and compare with eager;
prints the full error when compilation fails. Usage: python scripts/padded_compile_check.py"""
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import flashfuse  # noqa: E402,F401
from flashfuse.testing import models  # noqa: E402

for family in ["gpt2", "llama"]:
    model, inputs = models.build(family, device="cuda", seq=64)
    try:
        expected = models.first_output(model(**inputs))
        got = models.first_output(torch.compile(model, backend="flashfuse")(**inputs))
        print(family, "ok", (got - expected).abs().max().item(), flush=True)
    except Exception:
        traceback.print_exc()
