"""Flash-attention backward, dQ: programs own BLOCK_M queries and loop over their visible keys, like the forward.

Launched by flash_bwd.backward after the delta preprocess; P is recomputed from the forward's row stats.
"""
import triton
import triton.language as tl

from flashfuse.kernels.flash_common import _band, _dot, _dropout_keep, _row_stats, _score_tile


@triton.jit
def _dq_inner(dq, q, do, row_max, log_sum, delta, i, row, lo, hi, K, V, skn, skd, svn, svd, Bias, bias_off, sbn, Mask, mask_off,
              smn, seed, n_keys, shift, left, right, scale, softcap, mask_value, dropout_p,
              D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
              RAW: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
              MASKED: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    qk_scale = scale * 1.4426950408889634
    for start in tl.range(lo, hi, BLOCK_N):
        j = start + offs_n
        # -- k^T: (HEAD_D, BLOCK_N), v^T: (HEAD_DV, BLOCK_N) ----
        kt_ptrs = K + offs_d[:, None] * skd + j[None, :] * skn
        vt_ptrs = V + offs_dv[:, None] * svd + j[None, :] * svn
        if MASKED:
            kt = tl.load(kt_ptrs, mask=(offs_d[:, None] < D) & (j[None, :] < n_keys), other=0.0)
            vt = tl.load(vt_ptrs, mask=(offs_dv[:, None] < DV) & (j[None, :] < n_keys), other=0.0)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < D, other=0.0)
            vt = tl.load(vt_ptrs, mask=offs_dv[:, None] < DV, other=0.0)
        qk = _dot(q, kt, None, PRECISION)
        s, t, keep = _score_tile(qk, i[:, None], j[None, :], n_keys, shift, left, right, scale, softcap,
                                 mask_value, Bias, bias_off[:, None], sbn, Mask, mask_off[:, None], smn,
                                 HAS_BIAS, HAS_MASK, SOFTCAP, RAW, HAS_LEFT, HAS_RIGHT, MASKED)
        if RAW:
            p = tl.exp2(s * qk_scale - ((row_max + log_sum) * 1.4426950408889634)[:, None])
        else:
            p = tl.exp2((s - row_max[:, None]) * 1.4426950408889634 - (log_sum * 1.4426950408889634)[:, None])
        dp = _dot(do, vt, None, PRECISION)
        if DROPOUT:
            kept = _dropout_keep(seed, row, start, n_keys, dropout_p, BLOCK_N)
            dp = tl.where(kept, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_MASK:
            ds = tl.where(keep, ds, 0.0)
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, dO, Stats, Delta, Bias, Mask, Seed, dQ,
               sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
               sbb, sbh, sbm, sbn, smb, smh, smm, smn,
               n_heads, n_queries, n_keys, group, n_stats, scale, softcap, mask_value, left, right, dropout_p,
               N_BUCKET, CASE,
               D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, RAW: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    if HAS_RIGHT:  # causal-like: later query blocks see more keys, so start them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    hkv = h // group
    m0 = pid_m * BLOCK_M
    i = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    shift = n_keys - n_queries
    # load q, dO, row stats, delta: they stay in registers throughout
    q_valid = (i[:, None] < n_queries) & (offs_d[None, :] < D)
    q = tl.load(Q + b * sqb + h * sqh + i[:, None] * sqm + offs_d[None, :] * sqd, mask=q_valid, other=0.0)
    do = tl.load(dO + b * sdb + h * sdh + i[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=(i[:, None] < n_queries) & (offs_dv[None, :] < DV), other=0.0)
    row = (b * n_heads + h) * n_queries + i
    row_max, log_sum = _row_stats(Stats, row, n_stats, i < n_queries, True)
    delta = tl.load(Delta + row, mask=i < n_queries, other=0.0)
    K += b * skb + hkv * skh
    V += b * svb + hkv * svh
    ic = tl.minimum(i, n_queries - 1)
    bias_off = b * sbb + h * sbh + ic * sbm
    mask_off = b * smb + h * smh + ic * smm
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    dq = tl.zeros([BLOCK_M, HEAD_D], tl.float32)
    lo, mid_lo, mid_hi, hi = _band(m0, n_keys, shift, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    # stage 1: masked blocks left of the band; 2: mask-free band; 3: diagonal, window edge, ragged tail
    dq = _dq_inner(dq, q, do, row_max, log_sum, delta, i, row, lo, mid_lo, K, V, skn, skd, svn, svd, Bias, bias_off, sbn, Mask,
                   mask_off, smn, seed, n_keys, shift, left, right, scale, softcap, mask_value, dropout_p,
                   D, DV, HEAD_D, HEAD_DV, BLOCK_N, HAS_BIAS, HAS_MASK, SOFTCAP, RAW, HAS_LEFT, HAS_RIGHT, DROPOUT,
                   True, PRECISION)
    dq = _dq_inner(dq, q, do, row_max, log_sum, delta, i, row, mid_lo, mid_hi, K, V, skn, skd, svn, svd, Bias, bias_off, sbn,
                   Mask, mask_off, smn, seed, n_keys, shift, left, right, scale, softcap, mask_value, dropout_p,
                   D, DV, HEAD_D, HEAD_DV, BLOCK_N, HAS_BIAS, HAS_MASK, SOFTCAP, RAW, HAS_LEFT, HAS_RIGHT, DROPOUT,
                   False, PRECISION)
    dq = _dq_inner(dq, q, do, row_max, log_sum, delta, i, row, mid_hi, hi, K, V, skn, skd, svn, svd, Bias, bias_off, sbn, Mask,
                   mask_off, smn, seed, n_keys, shift, left, right, scale, softcap, mask_value, dropout_p,
                   D, DV, HEAD_D, HEAD_DV, BLOCK_N, HAS_BIAS, HAS_MASK, SOFTCAP, RAW, HAS_LEFT, HAS_RIGHT, DROPOUT,
                   True, PRECISION)
    dq = dq * scale
    tl.store(dQ + row[:, None] * D + offs_d[None, :], dq.to(dQ.dtype.element_ty), mask=q_valid)
