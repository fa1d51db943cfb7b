"""The `flashfuse` op family that every rewrite calls, with the spec as one string (spec.py):

    torch.ops.flashfuse.fwd(q, k, v, bias, mask, seed, spec) -> (out, stats)
    torch.ops.flashfuse.bwd(dout, q, k, v, bias, mask, seed, out, stats, spec, bias_grad) -> (dq, dk, dv, dbias)

bias, mask and seed are optional tensors (seed: int64 (1,), drawn by `new_seed`, when spec.dropout_p > 0);
stats (2, B, Hq, Nq) holds each row's max score and log-sum (cpu.py says why both). dbias is empty unless
bias_grad.

Both have fake implementations (FakeTensor, symbolic shapes, inductor) and `fwd` has autograd, so graphs
that call them train. Implementations: the Triton kernels for CUDA tensors (and for CPU tensors when
TRITON_INTERPRET=1), the CPU path otherwise. `attention` in api.py is the public, validated entry point.
"""
import os
from typing import Optional

import torch
from torch import Tensor

from flashfuse.kernels import cpu
from flashfuse.kernels.spec import AttentionSpec

#: How many times the op has run, by implementation; tests count rewritten sites with it.
CALLS = {"triton": 0, "cpu": 0}


def uses_triton(t: Tensor) -> bool:
    """CUDA tensors take the Triton kernels; CPU tensors do too under Triton's interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _implementation(t: Tensor):
    if uses_triton(t):
        from flashfuse.kernels import flash
        return "triton", flash
    return "cpu", cpu


@torch.library.custom_op("flashfuse::fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], seed: Optional[Tensor],
        spec: str) -> tuple[Tensor, Tensor]:
    name, impl = _implementation(q)
    CALLS[name] += 1
    out, stats = impl.forward(q, k, v, bias, mask, seed, AttentionSpec.decode(spec))
    return out.contiguous(), stats.contiguous()


@fwd.register_fake
def _(q, k, v, bias, mask, seed, spec):
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.shape[-1])), q.new_empty((2, b, h, n), dtype=cpu.stats_dtype(q.dtype))


@torch.library.custom_op("flashfuse::bwd", mutates_args=())
def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
        seed: Optional[Tensor], out: Tensor, stats: Tensor, spec: str,
        bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, impl = _implementation(q)
    dq, dk, dv, dbias = impl.backward(dout, q, k, v, bias, mask, seed, out, stats, AttentionSpec.decode(spec),
                                      bias_grad)
    dbias = q.new_empty(0) if dbias is None else dbias.contiguous()
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias


@bwd.register_fake
def _(dout, q, k, v, bias, mask, seed, out, stats, spec, bias_grad):
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias_grad else q.new_empty(0)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dbias)


def new_seed(like: Tensor) -> Tensor:
    """A fresh dropout seed: int64 of shape (1,) on like's device, drawn from torch's generator."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=like.device)


def call(q, k, v, spec: AttentionSpec, bias=None, mask=None):
    """Run the op for a spec: draws the dropout seed, returns (out, stats)."""
    seed = new_seed(q) if spec.dropout_p else None
    return torch.ops.flashfuse.fwd(q, k, v, bias, mask, seed, spec.encode())


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, seed, spec = inputs
    ctx.spec = spec
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(q, k, v, bias, mask, seed, *output)


def _backward(ctx, dout, _dstats):
    q, k, v, bias, mask, seed, out, stats = ctx.saved_tensors
    dq, dk, dv, dbias = bwd(dout, q, k, v, bias, mask, seed, out, stats, ctx.spec, ctx.bias_grad)
    return dq, dk, dv, (dbias if ctx.bias_grad else None), None, None, None


torch.library.register_autograd("flashfuse::fwd", _backward, setup_context=_setup_context)
