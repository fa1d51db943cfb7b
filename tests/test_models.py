"""Unmodified models from transformers and timm: every attention site rewritten, answers unchanged.

Each model is built from a tiny config (random weights, no downloads) with eager attention and a
padding mask where it takes one, compiled with backend="flashfuse" (inductor), and compared with
eager: the output, and every parameter's gradient. The op's calls are counted against the eager
model's softmax calls.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from flashfuse.kernels.op import CALLS
from flashfuse.testing import models
from flashfuse.tolerances import FORWARD, GRADIENT, gradients_error, relative_error

#: where the model tests run: "cpu" (CI) or "cuda" (bench/gpu_tests.sh)
DEVICE = os.environ.get("FLASHFUSE_TEST_DEVICE", "cpu")

SOFTMAXES = {F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax}


class CountSoftmax(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in SOFTMAXES
        return func(*args, **(kwargs or {}))


def op_calls(fn):
    """How many attention sites fn() ran: the op's calls on the CPU; on CUDA, where inductor launches the kernels
    of a compiled graph itself, the forward kernels the profiler saw."""
    if DEVICE == "cpu":
        before = sum(CALLS.values())
        result = fn()
        return sum(CALLS.values()) - before, result
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    forward = ("_fwd_kernel", "_decode_split_kernel")
    return sum(e.count for e in prof.key_averages() if e.key in forward), result


def run(model, inputs):
    out = models.first_output(model(**inputs))
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out, params, cotangent, allow_unused=True)


@pytest.mark.parametrize("family", models.CORE)
def test_model_is_rewritten_and_equivalent(family):
    model, inputs = models.build(family, device=DEVICE)
    with CountSoftmax() as counter:
        expected, expected_grads = run(model, inputs)
    assert counter.calls > 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="flashfuse")
    run(compiled, inputs)  # compile first: tracing runs the op's Python too
    calls, (actual, actual_grads) = op_calls(lambda: run(compiled, inputs))
    assert calls == counter.calls, "every softmax of the eager model is a flashfuse call"
    assert relative_error(actual, expected) < FORWARD[torch.float32]
    assert gradients_error(actual_grads, expected_grads) < GRADIENT[torch.float32]


@pytest.mark.parametrize("family, window", [("gpt2", None), ("llama", None), ("mistral", (4, -1))])
def test_in_graph_causal_masks_become_flags(family, window):
    """Without a padding mask, the causal (and sliding) mask transformers builds in the graph is skipped, not read."""
    model, inputs = models.build(family, device=DEVICE, padding=False)
    from flashfuse.testing import assert_equivalent
    names = list(inputs)
    sites = assert_equivalent(lambda *a: models.first_output(model(**dict(zip(names, a)))), *inputs.values(),
                              expected_sites=2, grad=False, options={"compiler": "eager"})
    window = window or (-1, -1)
    assert all(s.spec.causal and not s.operands["bias"] and s.spec.window == window for s in sites)
