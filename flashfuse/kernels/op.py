"""The `flashfuse` op family that every rewrite calls, with the spec as one string (spec.py):

    torch.ops.flashfuse.fwd(q, k, v, bias, mask, seed, spec) -> (out, stats, residual)
    torch.ops.flashfuse.bwd(dout, q, k, v, bias, mask, seed, out, stats, residual, dlse, spec, bias_grad)
        -> (dq, dk, dv, dbias)

bias, mask and seed are optional tensors (seed: int64 (1,), drawn by `new_seed`, when spec.random);
stats (2, B, Hq, Nq) holds each row's max score and log-sum (cpu.py says why both); residual is out's rounding
residual (B, Hq, Nq, Dv) with spec.fp32_delta, else empty (spec.py). dbias is empty unless bias_grad.
`fwd` has autograd, so graphs that call it train. The stats are differentiable as their sum, the row's
logsumexp (an attention sink's rescale reads it; rewrite.py): a gradient reaching stats[1] is taken as the
logsumexp's (dlse), one reaching stats[0] alone is not followed; the residual is not differentiable.

Both are `torch.library.triton_op`s: on CUDA tensors torch.compile sees the Triton kernel launches inside them
and inductor launches the kernels from its own generated code (no Python dispatch per call; CUDA graphs
capture them). Everything else goes through the opaque ops `flashfuse::opaque_fwd` / `opaque_bwd`, which
torch.compile calls as they are: the CPU path (cpu.py), float64, and the Triton kernels under
TRITON_INTERPRET=1 on CPU tensors. FLASHFUSE_OPAQUE=1 sends CUDA tensors there too (the op as one black box,
for comparisons). `attention` in api.py is the public, validated entry point.
"""
import os
from typing import Optional

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from flashfuse.kernels import configs, cpu
from flashfuse.kernels.spec import AttentionSpec

#: How many times the op's Python implementation ran, by path. Eager calls and opaque ops count per call;
#: a compiled CUDA graph runs the kernels from inductor's code, so it counts once, when it is traced.
CALLS = {"triton": 0, "cpu": 0}
OPAQUE = os.environ.get("FLASHFUSE_OPAQUE") == "1"


def uses_triton(t: Tensor) -> bool:
    """CUDA tensors take the Triton kernels; CPU tensors do too under Triton's interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def path(q: Tensor, v: Tensor) -> tuple:
    """(implementation, why): "triton", or "cpu" (the blockwise CPU-path code, on any device) with the reason.

    Decided before any launch, from device, dtype and head dims: a shape the kernels cannot hold never reaches them.
    """
    if not uses_triton(q):
        return "cpu", "CPU tensors (set TRITON_INTERPRET=1 to run the Triton kernels in the interpreter)"
    if configs.kernels_hold(q, v):
        return "triton", ""
    if q.dtype == torch.float64:
        return "cpu", "float64 (the kernels accumulate in fp32)"
    head = max(q.shape[-1], v.shape[-1])
    return "cpu", f"head dim {head} > {configs.MAX_HEAD_DIM}, more than the kernels' tiles hold"


def _traceable(kernel, grid):
    return wrap_triton(kernel)[grid]


def _visible_kernels(q, v):
    """True when torch.compile should see the kernel launches: CUDA, the Triton path, not FLASHFUSE_OPAQUE."""
    return q.is_cuda and path(q, v)[0] == "triton" and not OPAQUE


def _implementation(q: Tensor, v: Tensor):
    if path(q, v)[0] == "triton":
        from flashfuse.kernels import flash
        return "triton", flash
    return "cpu", cpu


def new_residual(q: Tensor, v: Tensor, spec: AttentionSpec) -> Tensor:
    """The buffer the forward writes out's rounding residual into: (B, Hq, Nq, Dv) in q's dtype with
    spec.fp32_delta, else empty."""
    return q.new_empty((*q.shape[:3], v.shape[-1])) if spec.fp32_delta else q.new_empty(0)


def training_spec(spec: AttentionSpec, dtype: torch.dtype, needs_grad: bool) -> AttentionSpec:
    """The spec for a call in `dtype`: half-precision training turns fp32_delta on (spec.py says why)."""
    if needs_grad and dtype in (torch.bfloat16, torch.float16) and not spec.fp8:
        return spec.replace(fp32_delta=True)
    return spec


def given(residual: Optional[Tensor]) -> Optional[Tensor]:
    """The residual as the implementations take it: None when the forward kept none (an empty tensor)."""
    return residual if residual is not None and residual.numel() else None


def run_forward(q, k, v, bias, mask, seed, spec: AttentionSpec):
    """The forward on the implementation `path` picks, counted in CALLS: (out, stats, residual, implementation
    module)."""
    name, impl = _implementation(q, v)
    CALLS[name] += 1
    residual = new_residual(q, v, spec)
    out, stats = impl.forward(q, k, v, bias, mask, seed, spec, residual=given(residual))
    return out, stats, residual, impl


@triton_op("flashfuse::fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], seed: Optional[Tensor],
        spec: str) -> tuple[Tensor, Tensor, Tensor]:
    if not _visible_kernels(q, v):
        return torch.ops.flashfuse.opaque_fwd(q, k, v, bias, mask, seed, spec)
    from flashfuse.kernels import flash
    CALLS["triton"] += 1
    decoded = AttentionSpec.decode(spec)
    residual = new_residual(q, v, decoded)
    out, stats = flash.forward(q, k, v, bias, mask, seed, decoded, launch=_traceable, residual=given(residual))
    return out, stats, residual


@triton_op("flashfuse::bwd", mutates_args=())
def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
        seed: Optional[Tensor], out: Tensor, stats: Tensor, residual: Tensor, dlse: Optional[Tensor], spec: str,
        bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if not _visible_kernels(q, v):
        return torch.ops.flashfuse.opaque_bwd(dout, q, k, v, bias, mask, seed, out, stats, residual, dlse, spec,
                                              bias_grad)
    from flashfuse.kernels import flash
    dq, dk, dv, dbias = flash.backward(dout, q, k, v, bias, mask, seed, out, stats, AttentionSpec.decode(spec),
                                       bias_grad, launch=_traceable, dlse=dlse, residual=given(residual))
    return dq, dk, dv, (q.new_empty(0) if dbias is None else dbias)


@torch.library.custom_op("flashfuse::opaque_fwd", mutates_args=())
def opaque_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
               seed: Optional[Tensor], spec: str) -> tuple[Tensor, Tensor, Tensor]:
    out, stats, residual, _ = run_forward(q, k, v, bias, mask, seed, AttentionSpec.decode(spec))
    return out.contiguous(), stats.contiguous(), residual


@opaque_fwd.register_fake
def _(q, k, v, bias, mask, seed, spec):
    b, h, n, _ = q.shape
    return (q.new_empty((b, h, n, v.shape[-1])), q.new_empty((2, b, h, n), dtype=cpu.stats_dtype(q.dtype)),
            new_residual(q, v, AttentionSpec.decode(spec)))


@torch.library.custom_op("flashfuse::opaque_bwd", mutates_args=())
def opaque_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask: Optional[Tensor],
               seed: Optional[Tensor], out: Tensor, stats: Tensor, residual: Tensor, dlse: Optional[Tensor],
               spec: str, bias_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _, impl = _implementation(q, v)
    dq, dk, dv, dbias = impl.backward(dout, q, k, v, bias, mask, seed, out, stats, AttentionSpec.decode(spec),
                                      bias_grad, dlse=dlse, residual=given(residual))
    dbias = q.new_empty(0) if dbias is None else dbias.contiguous()
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias


@opaque_bwd.register_fake
def _(dout, q, k, v, bias, mask, seed, out, stats, residual, dlse, spec, bias_grad):
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias_grad else q.new_empty(0)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dbias)


def new_seed(like: Tensor) -> Tensor:
    """A fresh dropout seed: int64 of shape (1,) on like's device, drawn from torch's generator."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=like.device)


def call(q, k, v, spec: AttentionSpec, bias=None, mask=None):
    """Run the op for a spec: draws the dropout seed, returns (out, stats, residual)."""
    seed = new_seed(q) if spec.random else None
    return torch.ops.flashfuse.fwd(q, k, v, bias, mask, seed, spec.encode())


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, seed, spec = inputs
    ctx.spec = spec
    ctx.bias_grad = bias is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(q, k, v, bias, mask, seed, *output)
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # the stats' gradient stays None unless a graph reads them (a sink's rescale)


def _backward(ctx, dout, dstats, _dresidual):
    q, k, v, bias, mask, seed, out, stats, residual = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dlse = None if dstats is None else dstats[1]
    dq, dk, dv, dbias = bwd(dout, q, k, v, bias, mask, seed, out, stats, residual, dlse, ctx.spec, ctx.bias_grad)
    return dq, dk, dv, (dbias if ctx.bias_grad else None), None, None, None


torch.library.register_autograd("flashfuse::fwd", _backward, setup_context=_setup_context)
