"""FP8 inputs for the forward: q, k, v in float8_e4m3fn with their scales, and the incoherent processing that
makes q and k easier to quantize.

Incoherent processing (FlashAttention-3's low-precision path): q and k are both multiplied by M = diag(signs) H
/ sqrt(n), H the n x n Sylvester-Hadamard matrix (entries +-1) and `signs` a fixed random +-1 vector, along the
head dim zero-padded to n (a power of two). M is orthogonal, so (q M)(k M)^T = q k^T exactly in exact arithmetic;
an outlier channel is spread over all n, so per-token scales fit the values better.

Scales: q and k one per token (its largest magnitude maps to E4M3_MAX), v one per channel over the keys (the
output's column d is multiplied by it at the end). Shapes, for q (B, H, N, D):

    q8, q_scale = quantize_reference(q, rotate=True)   # (B, H, N, n) float8_e4m3fn, (B, H, N) fp32
    v8t, v_scale = quantize_v(v)                       # (B, H, Dv, N) float8_e4m3fn, keys contiguous; (B, H, Dv)

`quantize(x, rotate, launch)` and `quantize_v(v, launch)` compute the same with Triton kernels (flash_fp8.py's
path; the rotation as one product with H, exact: H is +-1 and the products accumulate in fp32), the
`_reference` / launch-less forms in torch (the CPU path); all round to nearest even.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from flashfuse.kernels import configs
from flashfuse.kernels.flash_common import INTERPRET, _dot, precision

E4M3_MAX = 448.0  # the largest float8_e4m3fn
_TINY = 1e-30  # a row of zeros gets this amax, so its scale divides nothing by zero
MODES = ("plain", "incoherent")


def rotated_width(d):
    """The padded head dim the rotation runs over: the next power of two (at least 16, the smallest dot)."""
    return max(16, configs.pow2(d))


@functools.lru_cache(maxsize=None)
def _signs(n, device, dtype):
    """A fixed random +-1 vector of length n (seeded, so every call and process rotates alike)."""
    gen = torch.Generator().manual_seed(0x5EED + n)
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(device=device, dtype=dtype)


def signs(n, device="cpu", dtype=torch.float32):
    """The +-1 signs of the rotation over a padded head dim n."""
    return _signs(n, torch.device(device), dtype)


def hadamard(x, signs_):
    """x (..., n) times diag(signs) H / sqrt(n), by the fast Walsh-Hadamard transform (n log n additions)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {n}")
    y = x * signs_
    h = 1
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        y = torch.cat([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], dim=-1)
        h *= 2
    return y.reshape(x.shape) / math.sqrt(n)


def quantize_reference(x, rotate):
    """(x8, scale) in torch: x (B, H, N, D) -> (B, H, N, n) float8_e4m3fn and (B, H, N) fp32, n the padded
    width (D itself when not rotated). x8 * scale[..., None] approximates x M (or x)."""
    y = x.float()
    if rotate:
        n = rotated_width(x.shape[-1])
        y = hadamard(torch.nn.functional.pad(y, (0, n - x.shape[-1])), signs(n, x.device))
    scale = y.abs().amax(-1).clamp_min(_TINY) / E4M3_MAX
    return (y / scale[..., None]).to(torch.float8_e4m3fn), scale


def v_scale(v):
    """v's per-channel scale (B, H, Dv) fp32: the channel's largest magnitude over the keys maps to E4M3_MAX."""
    amax = torch.linalg.vector_norm(v, ord=math.inf, dim=-2)  # one reduction pass, exact (a max)
    return amax.float().clamp_min(_TINY) / E4M3_MAX


def quantize_v(v, launch=None):
    """(v8t, scale): v (B, H, N, Dv) as (B, H, Dv, N) float8_e4m3fn, keys contiguous (Hopper's FP8 products read
    their second operand that way), and a per-channel scale (B, H, Dv) fp32. With `launch`, the scaling, cast and
    transposed store run as one Triton kernel; else in torch."""
    scale = v_scale(v)
    if launch is None:
        v8 = (v.float() / scale[..., None, :]).to(torch.float8_e4m3fn)
        return v8.transpose(-1, -2).contiguous(), scale
    b, h, n_keys, dv = v.shape
    v8t = torch.empty((b, h, dv, n_keys), dtype=torch.float8_e4m3fn, device=v.device)
    block = 16 if INTERPRET else 64 if dv <= 128 else 32  # a 64 x 256 tile spills (scripts/compile_kernels.py)
    launch(_quantize_v_kernel, (configs.cdiv(n_keys, block), b * h))(
        v, scale, v8t, *v.stride()[:3], h, n_keys, DV=dv, HEAD_DV=configs.pow2(dv), EXACT=INTERPRET, BLOCK=block)
    return v8t, scale


def quantize(x, rotate, launch):
    """(x8, scale) as `quantize_reference` says, by the fused Triton kernel (`launch` as flash.py's launchers)."""
    b, h, n_rows, d = x.shape
    width = rotated_width(d) if rotate else configs.pow2(d)
    x8 = torch.empty((b, h, n_rows, width if rotate else d), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((b, h, n_rows), dtype=torch.float32, device=x.device)
    block, steps = (16, 2) if INTERPRET else (64, 4)
    grid = (configs.cdiv(n_rows, block * steps), b * h)
    launch(_quantize_kernel, grid)(
        x, signs(width, x.device), x8, scale, *x.stride()[:3], h, n_rows, D=d, WIDTH=width,
        OUT_D=x8.shape[-1], ROTATE=rotate, EXACT=INTERPRET,
        PRECISION="ieee" if x.dtype == torch.float32 else precision(x.dtype), BLOCK=block, STEPS=steps)
    return x8, scale


def dequantized(q, k, v, spec):
    """fp32 q, k, v as the FP8 path sees them: q and k rotated (incoherent) and each of the three through
    e4m3 and back. The CPU path runs these (P stays fp32 there: no FP8 products to feed)."""
    rotate = spec.fp8 == "incoherent"
    (q8, qs), (k8, ks), (v8t, vs) = quantize_reference(q, rotate), quantize_reference(k, rotate), quantize_v(v)
    return q8.float() * qs[..., None], k8.float() * ks[..., None], v8t.float().transpose(-1, -2) * vs[..., None, :]


def no_backward(spec):
    """The FP8 path is forward only: a backward through it is an error with the fix."""
    if spec.fp8:
        raise RuntimeError("flashfuse's FP8 attention is for inference and has no backward: run it under "
                           "torch.no_grad(), or leave fp8 off where gradients are needed")


@triton.jit
def to_e4m3(x, EXACT: tl.constexpr):
    """fp32 x (|x| <= E4M3_MAX) to float8e4nv, to nearest even. EXACT rounds onto the e4m3 grid in fp32 first:
    Triton's interpreter loses the carry into the exponent when it rounds (7.97 comes out as 4, not 8;
    docs/known-upstream-issues.md), and converts values already on the grid exactly."""
    if EXACT:
        a = tl.abs(x)
        bits = a.to(tl.int32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # 3 mantissa bits
        tiny = (a * 512.0 + 8388608.0) - 8388608.0  # below 2^-6 the grid is 2^-9: round a * 2^9 to an integer
        a = tl.where(a >= 0.015625, normal, tiny * (1.0 / 512.0))
        x = tl.where(x < 0, -a, a)
    return x.to(tl.float8e4nv)


@triton.jit
def _parity(x):
    # the parity of an int below 256: H[i, j] = (-1) ** parity(i & j)
    x = x ^ (x >> 4)
    x = x ^ (x >> 2)
    x = x ^ (x >> 1)
    return x & 1


@triton.jit
def _quantize_kernel(X, Signs, X8, Scale, sxb, sxh, sxn, n_heads, n_rows, D: tl.constexpr, WIDTH: tl.constexpr,
                     OUT_D: tl.constexpr, ROTATE: tl.constexpr, EXACT: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK: tl.constexpr, STEPS: tl.constexpr):
    # a program quantizes STEPS blocks of BLOCK rows, so that it builds the Hadamard matrix once for all of them
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    cols = tl.arange(0, WIDTH)
    signs_ = tl.load(Signs + cols)
    hadamard = (1.0 - 2.0 * _parity(cols[:, None] & cols[None, :]).to(tl.float32)).to(X.dtype.element_ty)
    for step in tl.range(0, STEPS):
        rows = (tl.program_id(0) * STEPS + step) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + b.to(tl.int64) * sxb + h * sxh + rows[:, None] * sxn + cols[None, :],
                    mask=(rows[:, None] < n_rows) & (cols[None, :] < D), other=0.0)
        if ROTATE:  # x diag(signs) H / sqrt(WIDTH): +-1 factors, so the products are exact and only the sums round
            x = (x.to(tl.float32) * signs_[None, :]).to(x.dtype)  # exact; the interpreter has no bf16 *
            y = _dot(x, hadamard, None, PRECISION) * (1.0 / tl.sqrt(WIDTH * 1.0))
        else:
            y = x.to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(y), 1), 1e-30) / 448.0
        x8 = to_e4m3(y / scale[:, None], EXACT)
        out = bh.to(tl.int64) * n_rows * OUT_D + rows[:, None] * OUT_D + cols[None, :]
        tl.store(X8 + out, x8, mask=(rows[:, None] < n_rows) & (cols[None, :] < OUT_D))
        tl.store(Scale + bh.to(tl.int64) * n_rows + rows, scale, mask=rows < n_rows)


@triton.jit
def _quantize_v_kernel(V, Scale, V8t, svb, svh, svn, n_heads, n_keys, DV: tl.constexpr, HEAD_DV: tl.constexpr,
                       EXACT: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    keys = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DV)
    inside = (keys[:, None] < n_keys) & (cols[None, :] < DV)
    v = tl.load(V + b.to(tl.int64) * svb + h * svh + keys[:, None] * svn + cols[None, :], mask=inside, other=0.0)
    scale = tl.load(Scale + bh.to(tl.int64) * DV + cols, mask=cols < DV, other=1.0)
    v8 = to_e4m3(v.to(tl.float32) / scale[None, :], EXACT)
    tl.store(V8t + bh.to(tl.int64) * DV * n_keys + cols[None, :] * n_keys + keys[:, None], v8, mask=inside)
