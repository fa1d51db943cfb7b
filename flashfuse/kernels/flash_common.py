"""What every flash kernel shares: the score tile (the op's formula, spec.py), P recomputed from the row stats,
the visible block band, dropout draws, and the host side's spec -> constexpr mapping.

A score tile holds queries `i` and keys `j` as broadcastable index tensors: [BM, 1] and [1, BN] for q @ k^T,
or [1, BM] and [BN, 1] for k @ q^T. The forward, dQ, dK/dV and decode kernels all build their scores here,
so bias, mask, softcap, causal/window and dropout follow one rule everywhere.

The spec reaches the kernels as constexprs (`constexprs`): SCALE, SOFTCAP, LEFT, RIGHT (the key bounds of
spec.key_bounds, -1 unbounded), DROPOUT_P, HAS_BIAS (0: none; 1: added before the mask; 2: after it,
spec.bias_last), HAS_MASK (0: none; 1: hidden scores take the runtime
`mask_value`; 2: they take -inf, a float that AOTInductor's generated code cannot spell: it prints `inf`; 3: they
take `mask_value` and keep their gradient, spec.fill_adds), RAW
(scores are just SCALE * q.k: no softcap, bias or mask, SCALE > 0, so the kernels keep raw q.k and fold
SCALE * LOG2E into exp2), PRECISION for the dots, and MASK_KEYS: the mask has no query dim (key padding), so a
tile reads one row of it, not a row per query.
A finite fill is a runtime argument, `mask_value` (`fill_argument`), so that fills do not multiply compiles.

SKIP_PADDING: key padding (MASK_KEYS, no bias) whose hidden keys get p = 0 exactly in every row that sees a kept
key, and whose rows that see none do not depend on them (`skips_padding`). Then each forward and dQ program cuts
its band to the blocks holding its batch's kept keys (`_kept_keys`, `_clip_band`), a decode split its chunk, and a
dK/dV program whose keys are all hidden does no work.
"""
import math
import os

import torch
import triton
import triton.language as tl

from flashfuse.kernels.spec import HUGE_FILL

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
# Philox-4x32-7 for dropout, as FlashAttention's and Composable Kernel's dropout use: the fewest rounds that
# pass TestU01's BigCrush (Salmon et al., 2011); Philox is the dropout kernels' main cost, and 10 rounds cost 3/7 more.
PHILOX_ROUNDS: tl.constexpr = tl.constexpr(7)
KEY_SCAN: tl.constexpr = tl.constexpr(1024)  # keys per step of `_kept_keys`


@triton.jit
def _tanh(x):
    # tanh through exp2 rather than libdevice, so the interpreter runs it too; saturates to +-1 cleanly
    e = tl.exp2(x * (2.0 * LOG2E))  # exp(2x)
    return 1.0 - 2.0 / (e + 1.0)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation; PRECISION "upcast" runs bf16 tiles as fp32 (the interpreter's dot
    cannot multiply bf16: it sees their raw bits). bf16 -> fp32 is exact, so the result is the same."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    return tl.dot(a, b, acc=acc, input_precision=PRECISION)


@triton.jit
def _bias_tile(bias_ptrs, j, n_keys, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(bias_ptrs, mask=j < n_keys, other=0.0).to(tl.float32)
    return tl.load(bias_ptrs).to(tl.float32)


@triton.jit
def _score_tile(qk, i, j, n_keys, shift, bias_ptrs, mask_ptrs, mask_value, MASKED: tl.constexpr, RAW: tl.constexpr,
                SCALE: tl.constexpr, SOFTCAP: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    """Scores of one tile from qk = q . k (fp32). Returns (s, t, keep).

    s: the scores; in raw q.k units when RAW (the caller folds SCALE into exp2), else SCALE * q.k,
       softcapped, plus bias, mask_value where the mask hides a key.
    t: tanh of the softcap (for its gradient); keep: the mask tile (for the gradient of hidden scores).
    bias_ptrs / mask_ptrs: pointers of this tile's bias / mask elements (their query rows clamped in range).
    MASKED: the tile may cross the key bound, the causal diagonal or the window; else every key is visible.
    """
    t = qk
    keep = qk
    if RAW:
        s = qk
    else:
        s = qk * SCALE
        if SOFTCAP != 0.0:
            t = _tanh(s * (1.0 / SOFTCAP))
            s = SOFTCAP * t
        if HAS_BIAS == 1:
            s += _bias_tile(bias_ptrs, j, n_keys, MASKED)
        if HAS_MASK:
            if MASKED:
                keep = tl.load(mask_ptrs, mask=j < n_keys, other=1) != 0
            else:
                keep = tl.load(mask_ptrs) != 0
            if HAS_MASK == 2:
                s = tl.where(keep, s, float("-inf"))
            else:  # fp32 explicitly: inductor types a float argument fp64, which would promote the scores
                s = tl.where(keep, s, tl.cast(mask_value, tl.float32))
        if HAS_BIAS == 2:  # bias_last: after the fill (a key the bias and the fill both hide gets -inf)
            s += _bias_tile(bias_ptrs, j, n_keys, MASKED)
    if MASKED:
        # bottom-right aligned: query i faces key i + shift (shift = Nk - Nq); hidden keys get -inf
        visible = j < n_keys
        if RIGHT >= 0:
            visible = visible & (j <= i + shift + RIGHT)
        if LEFT >= 0:
            visible = visible & (j >= i + shift - LEFT)
        s = tl.where(visible, s, float("-inf"))
    return s, t, keep


@triton.jit
def _recompute_p(s, row_max, log_sum, RAW: tl.constexpr, SCALE: tl.constexpr):
    """p = exp(s - max - log_sum) from the forward's row stats, broadcast as s is (row_max / log_sum already
    expanded along the key axis). Raw scores take the scale here."""
    if RAW:
        return tl.exp2(s * (SCALE * LOG2E) - (row_max + log_sum) * LOG2E)
    return tl.exp2((s - row_max) * LOG2E - log_sum * LOG2E)


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
def _query_block(n_heads, group, RIGHT: tl.constexpr, BLOCK_M: tl.constexpr):
    """What a program that owns BLOCK_M queries of one (batch, q head) works on: (pid_bh, b, h, hkv, m0, i), i the
    query indices. With a right bound (causal) later query blocks see more keys, so they start first."""
    pid_m = tl.program_id(0)
    if RIGHT >= 0:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    hkv = h // group
    m0 = pid_m * BLOCK_M
    return pid_bh, b, h, hkv, m0, m0 + tl.arange(0, BLOCK_M)


@triton.jit
def _band(own0, n_other, offset, BELOW: tl.constexpr, ABOVE: tl.constexpr, OWN_BLOCK: tl.constexpr,
          OTHER_BLOCK: tl.constexpr):
    """Block ranges along the other axis seen by the own block [own0, own0 + OWN_BLOCK), where own index x
    sees other indices [x + offset - BELOW, x + offset + ABOVE] (each side unbounded when it is -1).

    Returns (lo, mid_lo, mid_hi, hi): [lo, hi) holds every visible block (lo and mid_* are multiples of
    OTHER_BLOCK) and [mid_lo, mid_hi) the full blocks that every own index sees whole: no mask needed.
    Forward: own = queries, other = keys, offset = Nk - Nq, BELOW = LEFT, ABOVE = RIGHT; the dK/dV
    kernel runs it the other way round (offset = Nq - Nk, BELOW = RIGHT, ABOVE = LEFT).
    """
    lo = 0
    hi = n_other
    mid_lo = 0
    mid_hi = (n_other // OTHER_BLOCK) * OTHER_BLOCK
    # clamp before dividing: the interpreter floors negative quotients, compiled Triton truncates them
    if BELOW >= 0:
        lo = (tl.maximum(own0 + offset - BELOW, 0) // OTHER_BLOCK) * OTHER_BLOCK
        mid_lo = tl.cdiv(tl.maximum(own0 + OWN_BLOCK - 1 + offset - BELOW, 0), OTHER_BLOCK) * OTHER_BLOCK
    if ABOVE >= 0:
        hi = tl.minimum(hi, tl.maximum(own0 + OWN_BLOCK + offset + ABOVE, 0))
        mid_hi = tl.minimum(mid_hi, (tl.maximum(own0 + offset + ABOVE + 1, 0) // OTHER_BLOCK) * OTHER_BLOCK)
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    mid_hi = tl.maximum(tl.minimum(mid_hi, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _stage(stage: tl.constexpr, lo, mid_lo, mid_hi, hi):
    """The three stages of a band, as (start, end, MASKED): masked blocks below the full ones (window),
    the full blocks (no mask), masked blocks above them (diagonal, window edge, ragged tail)."""
    if stage == 0:
        return lo, mid_lo
    elif stage == 1:
        return mid_lo, mid_hi
    else:
        return mid_hi, hi


@triton.jit
def _kept_keys(mask_row, smn, lo, hi):
    """[first, end): the span of the keys in [lo, hi) that a key-padding mask row keeps (hi, lo when none).
    KEY_SCAN keys a step: the scan runs before the main loop and each step waits on a load, so few wide steps
    (one up to 1024 keys) rather than one per key block (GPT-2's forward: +17% GPU time with 64-key steps)."""
    first = hi
    end = lo
    for start in range(lo, hi, KEY_SCAN):
        j = start + tl.arange(0, KEY_SCAN)
        keep = tl.load(mask_row + j * smn, mask=j < hi, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(keep, j, hi), 0))
        end = tl.maximum(end, tl.max(tl.where(keep, j + 1, lo), 0))
    return first, end


@triton.jit
def _clip_band(lo, mid_lo, mid_hi, hi, first, end, BLOCK: tl.constexpr):
    """The band of `_band` cut to the blocks that hold keys of [first, end). Cuts fall on block edges, so the
    stages keep their shape (and dropout its groups of 8 keys); an empty span gives an empty band."""
    lo2 = tl.maximum(lo, (first // BLOCK) * BLOCK)
    hi2 = tl.maximum(tl.minimum(hi, tl.cdiv(end, BLOCK) * BLOCK), lo2)
    mid_lo2 = tl.minimum(tl.maximum(mid_lo, lo2), hi2)
    mid_hi2 = tl.minimum(tl.maximum(mid_hi, mid_lo2), hi2)
    return lo2, mid_lo2, mid_hi2, hi2


@triton.jit
def _dropout_keep(seed, rows, j0, n_keys, DROPOUT_P: tl.constexpr, BLOCK_N: tl.constexpr,
                  TRANSPOSED: tl.constexpr = False):
    """Counter-based keep-mask of rows x keys [j0, j0 + BLOCK_N): (len(rows), BLOCK_N), or its transpose.

    rows: (b * Hq + h) * Nq + i, int64; j0 a multiple of 8. One Philox call (4 x 32 bits) gives 16-bit draws
    for 8 keys, so a tile costs BLOCK_N / 8 calls per row; a key is kept when its draw >= p * 65536: with
    probability 1 - ceil(65536 p) / 65536, within 1.6e-5 below 1 - p. Philox runs PHILOX_ROUNDS rounds.
    """
    groups = (j0 // 8 + tl.arange(0, BLOCK_N // 8)).to(tl.int64)
    counters = rows[:, None] * tl.cdiv(n_keys, 8) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters, PHILOX_ROUNDS)
    words = tl.join(tl.join(r0, r1), tl.join(r2, r3))  # (M, BLOCK_N / 8, 2, 2)
    draws = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (rows.shape[0], BLOCK_N))
    if TRANSPOSED:
        draws = tl.trans(draws)
    return draws.to(tl.float32) >= DROPOUT_P * 65536.0


@triton.jit
def _keep_mask_kernel(Seed, Keep, n_keys, DROPOUT_P: tl.constexpr, BLOCK: tl.constexpr):
    # materializes the keep-mask of `_dropout_keep` for a (B, Hq, Nq, Nk) problem, as (rows, Nk) uint8
    row = tl.program_id(0).to(tl.int64)
    seed = tl.load(Seed)
    for start in range(0, n_keys, BLOCK):
        j = start + tl.arange(0, BLOCK)
        keep = _dropout_keep(seed, row + tl.arange(0, 1), start, n_keys, DROPOUT_P, BLOCK)  # (1, BLOCK)
        tl.store(Keep + row * n_keys + j[None, :], keep.to(tl.uint8), mask=j[None, :] < n_keys)


# -- host side ------------------------------------------------------------------------------------------------

def constexprs(spec, bias, mask, dtype):
    """The spec as the kernels' constexprs (the names the kernels' signatures share)."""
    left, right = spec.key_bounds()
    raw = bias is None and mask is None and not spec.softcap and spec.scale > 0
    has_mask = 0 if mask is None else 2 if spec.mask_value == -math.inf else 3 if spec.fill_adds else 1
    return dict(SCALE=spec.scale, SOFTCAP=spec.softcap, LEFT=left, RIGHT=right, DROPOUT_P=spec.dropout_p,
                HAS_BIAS=0 if bias is None else 2 if spec.bias_last else 1, HAS_MASK=has_mask, RAW=raw,
                PRECISION=precision(dtype),
                MASK_KEYS=mask is not None and mask.shape[2] == 1, SKIP_PADDING=skips_padding(spec, bias, mask))


def skips_padding(spec, bias, mask):
    """SKIP_PADDING: can the kernels skip the key blocks a key-padding mask hides whole and give the same answer?
    With -inf hidden keys add nothing. With a huge finite fill they add nothing to a row that sees a kept key,
    and a row that sees none is averaged afterwards (empty_rows="average", hidden_rows.py); under the formula's
    own rule ("nan", "zero") such a row would average the filled keys, so those blocks stay."""
    if mask is None or mask.shape[2] != 1 or bias is not None:
        return False
    return spec.mask_value == -math.inf or (spec.empty_rows == "average" and spec.mask_value <= HUGE_FILL)


def fill_argument(spec):
    """The runtime `mask_value` the kernels take: the spec's finite fill, else 0.0 (unused: HAS_MASK says -inf)."""
    return spec.mask_value if spec.mask_value != -math.inf else 0.0


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
    """A bool mask as uint8, which every Triton version loads: a view (no copy) of a plain tensor. While inductor
    traces the op (a fake or functional tensor) a conversion: its CUDA lowering of a bool -> uint8 view fails
    (torch.iinfo(torch.bool)); the copy it makes instead is of the mask as the graph passes it."""
    if mask is None:
        return None
    return mask.view(torch.uint8) if type(mask) is torch.Tensor else mask.to(torch.uint8)


def dropout_scale(seed, shape, spec, device, dtype=torch.float32):
    """What the kernels' dropout multiplies p by in a (B, Hq, Nq, Nk) problem, as a tensor of that shape: 0 for
    a dropped key, 1 / (1 - dropout_p) for a kept one. Tests pass it to reference.oracle(..., dropout_scale=...)."""
    b, h, nq, nk = shape
    keep = torch.empty((b * h * nq, nk), dtype=torch.uint8, device=device)
    _keep_mask_kernel[(b * h * nq,)](seed.to(device), keep, nk, DROPOUT_P=spec.dropout_p, BLOCK=64)
    return keep.reshape(shape).to(dtype) / (1.0 - spec.dropout_p)
