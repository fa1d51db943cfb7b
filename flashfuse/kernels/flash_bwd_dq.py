"""Flash-attention backward, dQ: programs own BLOCK_M queries and loop over their visible keys, like the forward.

Launched first by flash_bwd.backward: each program also computes delta = rowsum(dO * O) of its rows, which it
needs first and stores for the dK/dV kernel. P is recomputed from the forward's row stats.
"""
import triton
import triton.language as tl

from flashfuse.kernels.flash_common import (
    _band,
    _clip_band,
    _dot,
    _dropout_keep,
    _kept_keys,
    _query_block,
    _recompute_p,
    _row_stats,
    _score_tile,
    _stage,
)


@triton.jit
def _dq_inner(dq, q, do, row_max, log_sum, delta, i, row, lo, hi, K, V, skn, svn, bias_rows, sbn, mask_rows, smn,
              mask_value, seed, n_keys, shift, MASKED: tl.constexpr, RAW: tl.constexpr, SCALE: tl.constexpr,
              SOFTCAP: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, DROPOUT_P: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, D: tl.constexpr,
              DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    for start in tl.range(lo, hi, BLOCK_N):
        j = start + offs_n
        # -- k^T: (HEAD_D, BLOCK_N), v^T: (HEAD_DV, BLOCK_N) ----
        kt_ptrs = K + offs_d[:, None] + j[None, :] * skn
        vt_ptrs = V + offs_dv[:, None] + j[None, :] * svn
        if MASKED:
            kt = tl.load(kt_ptrs, mask=(offs_d[:, None] < D) & (j[None, :] < n_keys), other=0.0)
            vt = tl.load(vt_ptrs, mask=(offs_dv[:, None] < DV) & (j[None, :] < n_keys), other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < D, other=0.0)
            vt = tl.load(vt_ptrs, mask=offs_dv[:, None] < DV, other=0.0)
        qk = _dot(q, kt, None, PRECISION)
        s, t, keep = _score_tile(qk, i[:, None], j[None, :], n_keys, shift, bias_rows[:, None] + j[None, :] * sbn,
                                 mask_rows[:, None] + j[None, :] * smn, mask_value, MASKED, RAW, SCALE, SOFTCAP,
                                 LEFT, RIGHT, HAS_BIAS, HAS_MASK)
        p = _recompute_p(s, row_max[:, None], log_sum[:, None], RAW, SCALE)
        dp = _dot(do, vt, None, PRECISION)
        if DROPOUT_P > 0.0:
            kept = _dropout_keep(seed, row, start, n_keys, DROPOUT_P, BLOCK_N)
            dp = tl.where(kept, dp * (1.0 / (1.0 - DROPOUT_P)), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_MASK == 1 or HAS_MASK == 2:  # a filled score is a constant (3: the fill was added; see spec.py)
            ds = tl.where(keep, ds, 0.0)
        if SOFTCAP != 0.0:
            ds = ds * (1.0 - t * t)
        dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, PRECISION)
    return dq


@triton.jit
def _row_dot(A, B, rows_valid, DV: tl.constexpr, HEAD_DV: tl.constexpr):
    """rowsum(A * B) over DV columns (A, B: pointers of each row's first column), 32 columns at a time so the
    two tiles never sit in registers whole."""
    CHUNK: tl.constexpr = 32 if HEAD_DV > 32 else HEAD_DV
    total = tl.zeros([A.shape[0]], tl.float32)
    for c in tl.static_range(0, HEAD_DV, CHUNK):
        cols = c + tl.arange(0, CHUNK)[None, :]
        valid = rows_valid & (cols < DV)
        a = tl.load(A + cols, mask=valid, other=0.0)
        b = tl.load(B + cols, mask=valid, other=0.0)
        total += tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)
    return total


@triton.jit
def _dq_kernel(Q, K, V, dO, Stats, Delta, Bias, Mask, Seed, dQ, Out, Res,
               sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sbb, sbh, sbm, sbn, smb, smh, smm, smn,
               n_heads, group, n_queries, n_keys, mask_value,
               SCALE: tl.constexpr, SOFTCAP: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
               DROPOUT_P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, RAW: tl.constexpr,
               PRECISION: tl.constexpr, MASK_KEYS: tl.constexpr, SKIP_PADDING: tl.constexpr, DELTA_IN: tl.constexpr,
               RESIDUAL: tl.constexpr, D: tl.constexpr,
               DV: tl.constexpr,
               HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # DELTA_IN: Delta arrives holding -dlse, the gradient of each row's logsumexp, which joins delta
    pid_bh, b, h, hkv, m0, i = _query_block(n_heads, group, RIGHT, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    shift = n_keys - n_queries
    n_stats = tl.num_programs(1).to(tl.int64) * n_queries
    row = (b * n_heads + h) * n_queries + i
    row_max, log_sum = _row_stats(Stats, row, n_stats, i < n_queries, True)
    # delta = rowsum(dO * O), O contiguous; 0 on rows that saw no key (row_max +inf here; their O is NaN or 0).
    # With RESIDUAL, O is out + residual: the fp32 output, so that each row's dS sums to zero (spec.fp32_delta)
    do_rows = dO + b * sdb + h * sdh + i[:, None] * sdm
    delta = _row_dot(Out + row[:, None] * DV, do_rows, i[:, None] < n_queries, DV, HEAD_DV)
    if RESIDUAL:
        delta += _row_dot(Res + row[:, None] * DV, do_rows, i[:, None] < n_queries, DV, HEAD_DV)
    if DELTA_IN:
        delta += tl.load(Delta + row, mask=i < n_queries, other=0.0)
    delta = tl.where(row_max == float("inf"), 0.0, delta)
    tl.store(Delta + row, delta, mask=i < n_queries)
    # load q and dO: they stay in registers throughout
    q_valid = (i[:, None] < n_queries) & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + i[:, None] * sqm + offs_d[None, :], mask=q_valid, other=0.0)
    do = tl.load(dO + b * sdb + h * sdh + i[:, None] * sdm + offs_dv[None, :],
                 mask=(i[:, None] < n_queries) & (offs_dv[None, :] < DV), other=0.0)
    ic = tl.minimum(i, n_queries - 1)
    bias_rows = Bias + b * sbb + h * sbh + ic * sbm
    if MASK_KEYS:  # one mask row for every query (see flash_fwd)
        mask_rows = Mask + b * smb + h * smh + tl.zeros([1], tl.int64)
    else:
        mask_rows = Mask + b * smb + h * smh + ic * smm
    seed = 0
    if DROPOUT_P > 0.0:
        seed = tl.load(Seed)
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    lo, mid_lo, mid_hi, hi = _band(m0, n_keys, shift, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    if SKIP_PADDING:  # only the blocks that hold kept keys of this batch (flash_common)
        kept_lo, kept_hi = _kept_keys(Mask + b * smb + h * smh, smn, lo, hi)
        lo, mid_lo, mid_hi, hi = _clip_band(lo, mid_lo, mid_hi, hi, kept_lo, kept_hi, BLOCK_N)
    for stage in tl.static_range(3):
        if stage != 0 or LEFT >= 0:  # stage 0 holds blocks only under a window
            start, end = _stage(stage, lo, mid_lo, mid_hi, hi)
            dq = _dq_inner(dq, q, do, row_max, log_sum, delta, i, row, start, end, K + b * skb + hkv * skh,
                           V + b * svb + hkv * svh, skn, svn, bias_rows, sbn, mask_rows, smn, mask_value, seed,
                           n_keys, shift, stage != 1, RAW, SCALE, SOFTCAP, LEFT, RIGHT, DROPOUT_P, HAS_BIAS,
                           HAS_MASK, PRECISION, D, DV, HEAD_D, HEAD_DV, BLOCK_N)
    dq = dq * SCALE
    tl.store(dQ + row[:, None] * D + offs_d[None, :], dq.to(dQ.dtype.element_ty), mask=q_valid)
