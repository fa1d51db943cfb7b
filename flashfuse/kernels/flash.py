"""The Triton implementation of the op: dispatch to the forward, decode and backward kernels.

Same functions and contract as `reference.forward` / `reference.backward`. float64 inputs fall back to the
reference (the kernels accumulate in fp32). Short query blocks over long keys (decode) take the split-key
kernel in flash_decode.py; everything else the flash kernels of flash_fwd.py / flash_bwd.py.
"""
import torch

from flashfuse.kernels import flash_bwd, flash_decode, flash_fwd, reference
from flashfuse.kernels.flash_common import as_bytes, dropout_keep_mask, make_spec

__all__ = ["forward", "backward", "dropout_keep_mask"]


def forward(q, k, v, bias, mask, *, scale, softcap, mask_value, causal, window_left, window_right, dropout_p, seed):
    """Returns out (B, Hq, Nq, Dv) in q's dtype, contiguous, and stats (2, B, Hq, Nq) fp32: each row's max
    score and log-sum, so logsumexp = stats[0] + stats[1] (reference.py says why they are kept apart)."""
    if q.dtype == torch.float64:
        return reference.forward(q, k, v, bias, mask, scale=scale, softcap=softcap, mask_value=mask_value,
                                 causal=causal, window_left=window_left, window_right=window_right,
                                 dropout_p=dropout_p, seed=seed)
    spec = make_spec(bias, mask, scale=scale, softcap=softcap, mask_value=mask_value, causal=causal,
                     window_left=window_left, window_right=window_right, dropout_p=dropout_p)
    seed = None if dropout_p == 0.0 else seed
    if flash_decode.suits(q, k):
        return flash_decode.forward(q, k, v, bias, as_bytes(mask), seed, spec)
    return flash_fwd.forward(q, k, v, bias, as_bytes(mask), seed, spec)


def backward(dout, q, k, v, bias, mask, out, stats, *, scale, softcap, mask_value, causal, window_left, window_right,
             dropout_p, seed, bias_grad):
    """Returns dq, dk, dv (shapes and dtypes of q, k, v) and dbias (bias's shape and dtype) or None.

    stats: as forward returns them; a (B, Hq, Nq) log-sum-exp is taken too (exact except on rows whose max
    is a huge finite fill)."""
    if q.dtype == torch.float64:
        return reference.backward(dout, q, k, v, bias, mask, out, stats, scale=scale, softcap=softcap,
                                  mask_value=mask_value, causal=causal, window_left=window_left,
                                  window_right=window_right, dropout_p=dropout_p, seed=seed, bias_grad=bias_grad)
    spec = make_spec(bias, mask, scale=scale, softcap=softcap, mask_value=mask_value, causal=causal,
                     window_left=window_left, window_right=window_right, dropout_p=dropout_p)
    seed = None if dropout_p == 0.0 else seed
    return flash_bwd.backward(dout, q, k, v, bias, as_bytes(mask), out, stats, seed, spec, bias_grad)
