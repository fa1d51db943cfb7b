"""The oracle: the op's formula (spec.py) in float64, the (Nq, Nk) scores materialized.

Every implementation (the Triton kernels, the CPU path) is checked against `oracle` by the tests and
by bench/gpu_check.py; `scores` and `visible` are the formula's steps, which the CPU path reuses block
by block.

    out, lse = oracle(q, k, v, AttentionSpec(scale=0.125, causal=True))
"""
from typing import Optional

import torch
from torch import Tensor

from flashfuse.kernels.spec import AttentionSpec

__all__ = ["oracle", "oracle_gradients", "repeat_kv", "scores", "visible"]


def repeat_kv(t: Tensor, n: int) -> Tensor:
    """(B, Hkv, N, D) -> (B, Hkv * n, N, D): head h reads head h // n, as grouped-query attention does."""
    b, h, s, d = t.shape
    if n == 1:
        return t
    return t[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def visible(nq: int, nk: int, spec: AttentionSpec, device, start: int = 0, end: Optional[int] = None):
    """Bool (nq, end - start): which keys in [start, end) each query may see; None when every key is visible.

    Query i faces key i + nk - nq (aligned at the bottom right, so one decode query sees every key) and sees
    keys within spec.key_bounds() of it.
    """
    left, right = spec.key_bounds()
    if left < 0 and right < 0:
        return None
    end = nk if end is None else end
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    j = torch.arange(start, end, device=device)[None, :]
    keep = torch.ones(nq, end - start, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def _keys(t, start, end):
    return t if t is None or t.shape[-1] == 1 else t[..., start:end]


def scores(q: Tensor, k: Tensor, spec: AttentionSpec, bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
           start: int = 0, end: Optional[int] = None, dtype=None) -> Tensor:
    """The scores of keys [start, end): (B, Hq, Nq, end - start) in `dtype` (default: fp32, or float64 for
    float64 q), every step of the formula up to the softmax."""
    end = k.shape[2] if end is None else end
    dtype = dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    keys = repeat_kv(k, q.shape[1] // k.shape[1])[:, :, start:end]
    s = torch.matmul(q.to(dtype), keys.to(dtype).transpose(-1, -2)) * spec.scale
    if spec.softcap:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    if bias is not None and not spec.bias_last:
        s = s + _keys(bias, start, end).to(dtype)
    if mask is not None:
        s = s.masked_fill(~_keys(mask, start, end), spec.mask_value)
    if bias is not None and spec.bias_last:
        s = s + _keys(bias, start, end).to(dtype)
    keep = visible(q.shape[2], k.shape[2], spec, q.device, start, end)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s


def oracle(q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec, bias: Optional[Tensor] = None,
           mask: Optional[Tensor] = None, dropout_scale: Optional[Tensor] = None):
    """The op's result in float64: (out (B, Hq, Nq, Dv), lse (B, Hq, Nq)).

    q, k, v, bias: as the op takes them; they are upcast to float64 (pass float64 leaves to take gradients,
    or use `oracle_gradients`). dropout_scale: what dropout multiplies p by (0, or 1 / (1 - p) for a kept key),
    broadcastable to (B, Hq, Nq, Nk), as the implementation under test drew it (flash.dropout_scale,
    cpu.dropout_scale); None applies no dropout.
    A query that sees no key (every score -inf, or the mask's finite fill when spec.empty_rows == "average")
    gives NaN, 0 with empty_rows "zero", the mean of v over all keys with "average"; its lse is -inf, and only
    the mean's gradient (into v) flows back through it.
    """
    q, k, v = q.double(), k.double(), v.double()
    bias = None if bias is None else bias.double()
    s = scores(q, k, spec, bias, mask, dtype=torch.float64)
    if spec.fill_adds and mask is not None:  # s + fill: the fill's value, with the score's gradient
        raw = scores(q, k, spec, bias, dtype=torch.float64)
        filled = (s == spec.mask_value) & torch.isfinite(raw)
        s = torch.where(filled, raw - raw.detach() + spec.mask_value, s)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    if spec.empty_rows == "average":
        dead = ((s == spec.mask_value) | torch.isneginf(s)).all(-1, keepdim=True)
    lse = torch.logsumexp(s, -1).masked_fill(dead.squeeze(-1), float("-inf"))
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    if dropout_scale is not None:
        p = p * dropout_scale.double()
    vx = repeat_kv(v, q.shape[1] // v.shape[1])
    out = p @ vx
    if spec.empty_rows == "average":
        if spec.fill_adds:  # eager's s + fill: a uniform softmax over scores the fill swallowed, gradient and all
            raw = torch.matmul(q, repeat_kv(k, q.shape[1] // k.shape[1]).mT) * spec.scale
            uniform = torch.softmax(raw - raw.detach(), -1) @ vx
            return torch.where(dead, uniform, out), lse
        return torch.where(dead, vx.mean(-2, keepdim=True).expand_as(out), out), lse
    fill = 0.0 if spec.empty_rows == "zero" else float("nan")
    return torch.where(dead, torch.full_like(out, fill), out), lse


def oracle_gradients(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, spec: AttentionSpec,
                     bias: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                     dropout_scale: Optional[Tensor] = None):
    """(out, lse, dq, dk, dv, dbias) of `oracle` in float64 for the cotangent dout (dbias None without a bias)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if bias is not None:
        leaves.append(bias.detach().double().requires_grad_())
    out, lse = oracle(*leaves[:3], spec, leaves[3] if bias is not None else None, mask, dropout_scale)
    grads = torch.autograd.grad(out, leaves, torch.nan_to_num(dout.double()))
    return (out.detach(), lse.detach(), *grads) + ((None,) if bias is None else ())
