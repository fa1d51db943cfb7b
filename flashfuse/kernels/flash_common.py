"""What every flash kernel shares: the score tile (the op's semantics, in one place) and the host-side spec.

A score tile holds queries `i` and keys `j` given as broadcastable index tensors: [BM, 1] and [1, BN] for
q @ k^T, or [1, BM] and [BN, 1] for k @ q^T. The forward, backward and decode kernels all build their
scores here, so bias, mask, softcap, causal/window and dropout follow one rule everywhere.
"""
from typing import NamedTuple

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _tanh(x):
    # tanh through exp2 rather than libdevice, so the interpreter runs it too; saturates to +-1 cleanly
    e = tl.exp2(x * 2.8853900817779268)  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation; PRECISION "upcast" runs bf16 tiles as fp32 (the interpreter's dot
    cannot multiply bf16: it sees their raw bits). bf16 -> fp32 is exact, so the result is the same."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    return tl.dot(a, b, acc=acc, input_precision=PRECISION)


@triton.jit
def _score_tile(qk, i, j, n_keys, shift, left, right, scale, softcap, mask_value,
                bias_ptr, bias_off, stride_bn, mask_ptr, mask_off, stride_mn,
                HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, RAW: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASKED: tl.constexpr):
    """Scores of one tile from qk = q . k (fp32). Returns (s, t, keep).

    s: the scores; in raw q.k units when RAW (no bias, mask or softcap: the caller folds scale into exp2),
       else scale * q.k, softcapped, plus bias, mask_value where the mask hides a key.
    t: tanh of the softcap (for its gradient), keep: the mask tile (for the gradient of hidden scores).
    MASKED: the tile may cross the key bound, the causal diagonal or the window; else every key is visible.
    bias_off / mask_off: per-query offsets, already holding batch, head and (clamped) query terms.
    """
    t = qk
    keep = qk
    if RAW:
        s = qk
    else:
        s = qk * scale
        if SOFTCAP:
            t = _tanh(s / softcap)
            s = softcap * t
        if HAS_BIAS:
            if MASKED:
                b = tl.load(bias_ptr + bias_off + j * stride_bn, mask=j < n_keys, other=0.0)
            else:
                b = tl.load(bias_ptr + bias_off + j * stride_bn)
            s = s + b.to(tl.float32)
        if HAS_MASK:
            if MASKED:
                keep = tl.load(mask_ptr + mask_off + j * stride_mn, mask=j < n_keys, other=1) != 0
            else:
                keep = tl.load(mask_ptr + mask_off + j * stride_mn) != 0
            s = tl.where(keep, s, mask_value)
    if MASKED:
        # bottom-right aligned: query i faces key i + shift (shift = Nk - Nq); hidden keys get -inf
        visible = j < n_keys
        if HAS_RIGHT:
            visible = visible & (j <= i + shift + right)
        if HAS_LEFT:
            visible = visible & (j >= i + shift - left)
        s = tl.where(visible, s, float("-inf"))
    return s, t, keep


@triton.jit
def _row_stats(Stats, rows, n_stats, valid, MASKED: tl.constexpr):
    """Row max and log-sum for recomputing p = exp(s - max - logsum); rows out of range or that saw no key
    get max = +inf and logsum = 0, so their p is 0, never NaN."""
    if MASKED:
        row_max = tl.load(Stats + rows, mask=valid, other=float("inf"))
        log_sum = tl.load(Stats + n_stats + rows, mask=valid, other=0.0)
    else:
        row_max = tl.load(Stats + rows)
        log_sum = tl.load(Stats + n_stats + rows)
    empty = row_max == float("-inf")
    return tl.where(empty, float("inf"), row_max), tl.where(empty, 0.0, log_sum)


@triton.jit
def _band(own0, n_other, offset, below, above, HAS_BELOW: tl.constexpr, HAS_ABOVE: tl.constexpr,
          OWN_BLOCK: tl.constexpr, OTHER_BLOCK: tl.constexpr):
    """Block ranges along the other axis seen by the own block [own0, own0 + OWN_BLOCK), where own index x
    sees other indices [x + offset - below, x + offset + above] (below/above unbounded unless HAS_*).

    Returns (lo, mid_lo, mid_hi, hi): [lo, hi) holds every visible block (lo and mid_* are multiples of
    OTHER_BLOCK) and [mid_lo, mid_hi) the full blocks that every own index sees whole: no mask needed.
    Forward: own = queries, other = keys, offset = Nk - Nq, below = left, above = right; the dK/dV
    kernel runs it the other way round (offset = Nq - Nk, below = right, above = left).
    """
    lo = 0
    hi = n_other
    mid_lo = 0
    mid_hi = (n_other // OTHER_BLOCK) * OTHER_BLOCK
    # clamp before dividing: the interpreter floors negative quotients, compiled Triton truncates them
    if HAS_BELOW:
        lo = (tl.maximum(own0 + offset - below, 0) // OTHER_BLOCK) * OTHER_BLOCK
        mid_lo = tl.cdiv(tl.maximum(own0 + OWN_BLOCK - 1 + offset - below, 0), OTHER_BLOCK) * OTHER_BLOCK
    if HAS_ABOVE:
        hi = tl.minimum(hi, tl.maximum(own0 + OWN_BLOCK + offset + above, 0))
        mid_hi = tl.minimum(mid_hi, (tl.maximum(own0 + offset + above + 1, 0) // OTHER_BLOCK) * OTHER_BLOCK)
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(mid_hi, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _dropout_keep(seed, rows, j0, n_keys, dropout_p, BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """Counter-based keep-mask of rows x keys [j0, j0 + BLOCK_N): (len(rows), BLOCK_N), or its transpose.

    rows: (b * Hq + h) * Nq + i, int64; j0 a multiple of 8. One Philox call (4 x 32 bits) gives 16-bit draws
    for 8 keys, so a tile costs BLOCK_N / 8 calls per row; a key is kept when its draw >= p * 65536: with
    probability 1 - ceil(65536 p) / 65536, within 1.6e-5 below 1 - p.
    """
    groups = (j0 // 8 + tl.arange(0, BLOCK_N // 8)).to(tl.int64)
    counters = rows[:, None] * tl.cdiv(n_keys, 8) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    words = tl.join(tl.join(r0, r1), tl.join(r2, r3))  # (M, BLOCK_N / 8, 2, 2)
    draws = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (rows.shape[0], BLOCK_N))
    if TRANSPOSED:
        draws = tl.trans(draws)
    return draws.to(tl.float32) >= dropout_p * 65536.0


@triton.jit
def _keep_mask_kernel(Seed, Keep, rows, n_keys, dropout_p, BLOCK: tl.constexpr):
    # materializes the keep-mask of `_dropout_keep` for a (B, Hq, Nq, Nk) problem, as (rows, Nk) uint8
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(Seed)
    for start in range(0, n_keys, BLOCK):
        j = start + tl.arange(0, BLOCK)
        keep = _dropout_keep(seed, row + tl.arange(0, 1), start, n_keys, dropout_p, BLOCK)  # (1, BLOCK)
        tl.store(Keep + row * n_keys + j[None, :], keep.to(tl.uint8), mask=j[None, :] < n_keys)


class Spec(NamedTuple):
    """The op's flags as the kernels take them."""
    scale: float
    softcap: float
    mask_value: float
    left: int  # keys visible left of the aligned diagonal (-1: unbounded)
    right: int  # keys visible right of it; causal makes this <= 0 (-1: unbounded)
    dropout_p: float
    raw: bool  # no bias, mask or softcap and scale > 0: scale folds into exp2

    @property
    def has_left(self):
        return self.left >= 0

    @property
    def has_right(self):
        return self.right >= 0

    @property
    def case(self):
        """Autotune key of the masking case: 0 full, 1 causal-like (right bound), 2 window (left bound)."""
        return 2 if self.has_left else (1 if self.has_right else 0)


def make_spec(bias, mask, *, scale, softcap, mask_value, causal, window_left, window_right, dropout_p):
    right = window_right
    if causal:
        right = 0 if right < 0 else min(right, 0)
    raw = bias is None and mask is None and not softcap and scale > 0
    return Spec(float(scale), float(softcap), float(mask_value), int(window_left), int(right), float(dropout_p), raw)


def precision(dtype):
    """Dot precision: fp32 products in tf32 when torch allows it for matmuls, else ieee fp32."""
    if INTERPRET and dtype == torch.bfloat16:
        return "upcast"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def broadcast_strides(t):
    """Strides of a 4-D bias or mask with 0 on its size-1 (broadcast) dims, or zeros for None."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def as_bytes(mask):
    """A bool mask as uint8 of the same strides (no copy), which every Triton version loads."""
    return None if mask is None else mask.view(torch.uint8)


def dropout_keep_mask(seed, shape, dropout_p, device):
    """The kernels' dropout keep-mask for a (B, Hq, Nq, Nk) problem, as a bool tensor of that shape.

    Tests pass it to reference.naive(..., dropout_keep_mask=...) to check the kernels' dropout.
    """
    b, h, nq, nk = shape
    keep = torch.empty((b * h * nq, nk), dtype=torch.uint8, device=device)
    _keep_mask_kernel[(b * h * nq,)](seed.to(device), keep, b * h * nq, nk, float(dropout_p), BLOCK=64)
    return keep.view(torch.bool).reshape(shape)
