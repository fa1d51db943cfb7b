"""`flashfuse.attention`: the validated public entry point to the op.

Under torch.compile, with tensor subclasses or with a dispatch mode active it calls the op
(`torch.ops.flashfuse.fwd`), which every PyTorch subsystem understands. Otherwise (plain tensors, eager) it calls
the implementation directly through a small autograd.Function: the same kernels and results, without
torch.library's Python dispatch layers (tens of microseconds per call, which short attention calls notice).
"""
from typing import Optional, Union

import torch
from torch import Tensor

from flashfuse.kernels import op
from flashfuse.kernels.spec import AttentionSpec


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, bias: Optional[Tensor] = None,
              mask: Optional[Tensor] = None, causal: bool = False, window: Optional[tuple] = None,
              softcap: Optional[float] = None, dropout_p: float = 0.0, empty_rows: str = "nan",
              fp8: Union[bool, str] = False) -> Tensor:
    r"""Fused scaled dot-product attention with the flashfuse kernels.

    Shape legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), Nq queries, Nk keys,
    D head dim of q and k, Dv head dim of v.

    Args:
        q: (B, Hq, Nq, D). k: (B, Hkv, Nk, D). v: (B, Hkv, Nk, Dv). One floating dtype, one device.
        scale: multiplies q @ k^T; defaults to D ** -0.5.
        bias: float tensor broadcastable to (B, Hq, Nq, Nk), added to the scores (after softcap).
            It is never expanded in memory, and it gets a gradient when it requires one.
        mask: bool tensor broadcastable to (B, Hq, Nq, Nk); False hides the key.
        causal: hide key j from query i when j > i + Nk - Nq (aligned at the bottom right).
        window: (left, right): hide keys j < i + Nk - Nq - left or j > i + Nk - Nq + right; -1 is unbounded.
        softcap: scores become softcap * tanh(scores / softcap) before the bias.
        dropout_p: dropout on the probabilities (training only: pass 0.0 in eval).
        empty_rows: what a query that sees no key gives: "nan", as softmax over a row of -inf does, or
            "zero", as SDPA gives.
        fp8: inference in FP8: q, k, v quantized to float8_e4m3fn (per-token q / k scales, per-channel v
            scales) after the same random orthogonal Hadamard rotation of q and k (True or "incoherent"), or
            without it ("plain"). No gradient, no bias, no dropout; errors against float64 are in the README.

    Returns:
        (B, Hq, Nq, Dv) in q's dtype. The softmax runs in fp32.

    Example::

        >>> q, k, v = (torch.randn(2, 8, 128, 64) for _ in range(3))
        >>> flashfuse.attention(q, k, v, causal=True).shape
        torch.Size([2, 8, 128, 64])
    """
    _validate_qkv(q, k, v)
    b, hq, nq, d = q.shape
    full = (b, hq, nq, k.shape[2])
    bias = _validate_broadcast("bias", bias, full, q.device, float_only=True)
    mask = _validate_broadcast("mask", mask, full, q.device, float_only=False)
    spec = AttentionSpec(scale=d ** -0.5 if scale is None else _scalar(scale), causal=causal,
                         window=(-1, -1) if window is None else window,
                         softcap=0.0 if softcap is None else _scalar(softcap), dropout_p=dropout_p,
                         empty_rows=empty_rows, fp8=_fp8_mode(fp8, q, k, v, bias))
    if spec.softcap == 0.0 and softcap is not None:
        raise ValueError("softcap must be positive (None for no softcap), got 0")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))
    spec = op.training_spec(spec, q.dtype, needs_grad)
    if not _direct_ok(q, k, v, bias, mask):
        return op.call(q, k, v, spec, bias, mask)[0]
    if needs_grad:
        return _Attention.apply(q, k, v, bias, mask, spec)
    return _forward(q, k, v, bias, mask, spec)[0]


def _fp8_mode(fp8, q, k, v, bias):
    """The spec's fp8 field for the `fp8` argument, after checking that the call can run in FP8."""
    if fp8 is False or fp8 == "":
        return ""
    mode = "incoherent" if fp8 is True else fp8
    if mode not in ("plain", "incoherent"):
        raise ValueError(f"fp8 must be True, False, 'plain' or 'incoherent', got {fp8!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("fp8 attention is for inference and has no backward: call it under torch.no_grad() "
                         "(or with inputs that do not require grad), or leave fp8 off")
    if bias is not None:
        raise ValueError("fp8 attention takes no bias: pass a bool mask instead, or leave fp8 off")
    return mode


def _direct_ok(*tensors):
    """Plain tensors, no compilation, no Python dispatch or function mode: nothing the op's dispatch would add."""
    return (not torch.compiler.is_compiling() and all(t is None or type(t) is Tensor for t in tensors)
            and not torch._C._is_torch_function_mode_enabled() and torch._C._len_torch_dispatch_stack() == 0)


def _forward(q, k, v, bias, mask, spec):
    seed = op.new_seed(q) if spec.random else None
    out, stats, residual, impl = op.run_forward(q, k, v, bias, mask, seed, spec)
    return out, stats, seed, residual, impl


class _Attention(torch.autograd.Function):
    """The op's autograd (op.py) for eager calls on plain tensors, without the dispatcher round trips."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, spec):
        out, stats, seed, residual, impl = _forward(q, k, v, bias, mask, spec)
        ctx.spec, ctx.impl = spec, impl
        ctx.save_for_backward(q, k, v, bias, mask, seed, out, stats, residual)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, mask, seed, out, stats, residual = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = ctx.impl.backward(dout, q, k, v, bias, mask, seed, out, stats, ctx.spec, bias_grad,
                                              residual=op.given(residual))
        return dq, dk, dv, dbias, None, None


def _validate_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}; "
                             "for 3-D (B*H, N, D) inputs call with t.unsqueeze(0)")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    (b, hq, _, d), (bk, hkv, nk, dk) = q.shape, k.shape
    if bk != b:
        raise ValueError(f"k has batch {bk} but q has batch {b}")
    if dk != d:
        raise ValueError(f"k must have q's head dim {d} as its last dim, got shape {tuple(k.shape)}")
    if tuple(v.shape[:3]) != (b, hkv, nk):
        raise ValueError(f"v must have shape ({b}, {hkv}, {nk}, Dv) to match k, got {tuple(v.shape)}")
    if (hkv == 0 and hq != 0) or (hkv != 0 and hq % hkv != 0):  # no heads at all: nothing to compute
        raise ValueError(f"q's head count {hq} must be a multiple of k's head count {hkv} (grouped-query attention)")


def _validate_broadcast(name, t, full, device, float_only):
    """Check that t broadcasts to `full` (B, Hq, Nq, Nk) and return it as 4-D, never expanded."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if float_only and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor (use mask= for booleans), got {t.dtype}")
    if not float_only and t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True keeps a key; use bias= for float masks), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")
    if t.dim() > 4 or any(n != 1 and n != f for n, f in zip(t.shape[::-1], full[::-1])):
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to (B, Hq, Nq, Nk) = {full}")
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _scalar(x):
    """A Python number from x (a one-element tensor too); AttentionSpec checks its range."""
    return x.item() if isinstance(x, Tensor) and x.numel() == 1 else x
