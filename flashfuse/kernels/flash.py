"""The op on the Triton kernels: forward (flash or split-key decode) and backward.

Same contract as the CPU path (cpu.py). float64 inputs and head dims over configs.MAX_HEAD_DIM take the CPU
path's blockwise code (the kernels accumulate in fp32; their tiles hold at most that head dim), empty
problems empty.py. Few queries over long keys (decode) take flash_decode.py; an FP8 spec flash_fp8.py; everything
else the flash kernels of flash_fwd.py / flash_bwd.py.
"""
from flashfuse.kernels import configs, cpu, empty, flash_bwd, flash_decode, flash_fp8, flash_fwd, flash_hidden
from flashfuse.kernels.flash_common import as_bytes, dropout_scale
from flashfuse.kernels.flash_fwd import unit_last_stride
from flashfuse.kernels.fp8 import no_backward

__all__ = ["forward", "backward", "dropout_scale"]


def direct(kernel, grid):
    """Launch a kernel as Triton does."""
    return kernel[grid]


def forward(q, k, v, bias, mask, seed, spec, launch=direct, residual=None):
    """out (B, Hq, Nq, Dv) in q's dtype, contiguous, and stats (2, B, Hq, Nq) fp32 (see cpu.py); with spec.fp32_delta
    out's rounding residual goes into `residual` (B, Hq, Nq, Dv), contiguous.

    launch(kernel, grid) returns what to call with the kernel's arguments: `direct`, or torch's
    wrap_triton so that torch.compile sees the kernels (op.py)."""
    if not configs.kernels_hold(q, v) or empty.is_empty(q, k):
        return cpu.forward(q, k, v, bias, mask, seed, spec, residual=residual)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    seed = seed if spec.random else None
    if spec.fp8:
        out, stats = flash_fp8.forward(q, k, v, bias, as_bytes(mask), spec, launch)
        return flash_hidden.finish_forward(out, stats, v, spec, launch)
    if residual is None and flash_decode.suits(q, k):  # decode is for inference: it keeps no residual
        out, stats = flash_decode.forward(q, k, v, bias, as_bytes(mask), seed, spec, launch)
        return flash_hidden.finish_forward(out, stats, v, spec, launch)
    return flash_fwd.forward(q, k, v, bias, as_bytes(mask), seed, spec, launch, residual)  # hidden rows inside


def backward(dout, q, k, v, bias, mask, seed, out, stats, spec, bias_grad, launch=direct, dlse=None, residual=None):
    """dq, dk, dv (shapes and dtypes of q, k, v) and dbias (bias's shape and dtype) or None. dlse (B, Hq, Nq) or
    None: the gradient of the rows' logsumexp, stats[0] + stats[1] (an attention sink's rescale reads it).
    residual: what the forward wrote there with spec.fp32_delta, or None."""
    no_backward(spec)
    if not configs.kernels_hold(q, v) or empty.is_empty(q, k):
        return cpu.backward(dout, q, k, v, bias, mask, seed, out, stats, spec, bias_grad, dlse, residual)
    q, k, v, dout = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), unit_last_stride(dout)
    seed = seed if spec.random else None
    dq, dk, dv, dbias = flash_bwd.backward(dout, q, k, v, bias, as_bytes(mask), seed, out, stats, spec, bias_grad,
                                           launch, dlse, residual)
    return (*flash_hidden.finish_backward((dq, dk, dv), dout, q, k, v, stats, spec, launch), dbias)
