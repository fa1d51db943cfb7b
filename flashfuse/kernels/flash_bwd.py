"""Flash-attention backward: delta preprocess, a dK/dV kernel, and the launcher of both and of dQ (flash_bwd_dq.py).

No atomics on dQ/dK/dV. P is recomputed from the forward's row stats (max, log-sum). dK/dV programs own
BLOCK_N keys of one KV head and loop over the q heads of its group (GQA reduced in registers) and their
visible query blocks; they also write dBias, reduced over its broadcast dims (atomics only where a broadcast
dim makes programs share an element).
"""
import torch
import triton
import triton.language as tl

from flashfuse.kernels import configs
from flashfuse.kernels.flash_bwd_dq import _dq_kernel
from flashfuse.kernels.flash_common import (_band, _dot, _dropout_keep, _row_stats, _score_tile, broadcast_strides,
                                           precision)


@triton.jit
def _bwd_preprocess(Out, dO, Stats, Delta, sob, soh, som, sod, sdb, sdh, sdm, sdd, n_heads, n_queries,
                    DV: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta = rowsum(dO * O): (B, Hq, Nq); 0 on rows that saw no key (their O is NaN)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DV)
    valid = (i[:, None] < n_queries) & (d[None, :] < DV)
    o = tl.load(Out + b * sob + h * soh + i[:, None] * som + d[None, :] * sod, mask=valid, other=0.0)
    do = tl.load(dO + b * sdb + h * sdh + i[:, None] * sdm + d[None, :] * sdd, mask=valid, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = pid_bh.to(tl.int64) * n_queries + i
    row_max = tl.load(Stats + row, mask=i < n_queries, other=0.0)
    tl.store(Delta + row, tl.where(row_max == float("-inf"), 0.0, delta), mask=i < n_queries)


@triton.jit
def _dkdv_inner(dk, dv, k, v, j, lo, hi, Q, dO, Stats, n_stats, Delta, sqm, sqd, sdm, sdd, row0,
                Bias, bias_off, sbm, sbn, Mask, mask_off, smm, smn, DBias, dbias_off, sdbm, sdbn, seed,
                n_queries, n_keys, shift, left, right, scale, softcap, mask_value, dropout_p,
                D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                RAW: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
                BIAS_GRAD: tl.constexpr, DB_Q1: tl.constexpr, DB_K1: tl.constexpr, DB_ATOMIC: tl.constexpr,
                MASKED: tl.constexpr, PRECISION: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    j0 = tl.min(j, 0)  # the first key of this block: dropout draws come in groups of 8 keys
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    qk_scale = scale * 1.4426950408889634
    for start in tl.range(lo, hi, BLOCK_M):
        i = start + offs_m
        # -- q^T: (HEAD_D, BLOCK_M), dO: (BLOCK_M, HEAD_DV) ----
        qt_ptrs = Q + offs_d[:, None] * sqd + i[None, :] * sqm
        do_ptrs = dO + i[:, None] * sdm + offs_dv[None, :] * sdd
        if MASKED:
            qt = tl.load(qt_ptrs, mask=(offs_d[:, None] < D) & (i[None, :] < n_queries), other=0.0)
            do = tl.load(do_ptrs, mask=(i[:, None] < n_queries) & (offs_dv[None, :] < DV), other=0.0)
            delta = tl.load(Delta + row0 + i, mask=i < n_queries, other=0.0)
        else:
            qt = tl.load(qt_ptrs, mask=offs_d[:, None] < D, other=0.0)
            do = tl.load(do_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
            delta = tl.load(Delta + row0 + i)
        row_max, log_sum = _row_stats(Stats, row0 + i, n_stats, i < n_queries, MASKED)
        qkt = _dot(k, qt, None, PRECISION)  # (BLOCK_N, BLOCK_M)
        ic = tl.minimum(i, n_queries - 1)
        s, t, keep = _score_tile(qkt, i[None, :], j[:, None], n_keys, shift, left, right, scale, softcap,
                                 mask_value, Bias, (bias_off + ic * sbm)[None, :], sbn, Mask,
                                 (mask_off + ic * smm)[None, :], smn, HAS_BIAS, HAS_MASK, SOFTCAP, RAW,
                                 HAS_LEFT, HAS_RIGHT, MASKED)
        if RAW:
            pt = tl.exp2(s * qk_scale - ((row_max + log_sum) * 1.4426950408889634)[None, :])
        else:
            pt = tl.exp2((s - row_max[None, :]) * 1.4426950408889634 - (log_sum * 1.4426950408889634)[None, :])
        # -- dV += P^T dO; dP^T = V dO^T ----
        dpt = _dot(v, tl.trans(do), None, PRECISION)
        if DROPOUT:
            kept = _dropout_keep(seed, row0 + i, j0, n_keys, dropout_p, j.shape[0], True)
            inv = 1.0 / (1.0 - dropout_p)
            dv = _dot(tl.where(kept, pt * inv, 0.0).to(do.dtype), do, dv, PRECISION)
            dpt = tl.where(kept, dpt * inv, 0.0)
        else:
            dv = _dot(pt.to(do.dtype), do, dv, PRECISION)
        # -- dS = P * (dP - delta): the gradient of the post-bias scores ----
        dst = pt * (dpt - delta[None, :])
        if HAS_MASK:
            dst = tl.where(keep, dst, 0.0)
        if BIAS_GRAD:
            if DB_Q1 and DB_K1:
                tl.atomic_add(DBias + dbias_off, tl.sum(tl.sum(dst, 1), 0))
            elif DB_Q1:
                tl.atomic_add(DBias + dbias_off + j * sdbn, tl.sum(dst, 1), mask=j < n_keys)
            elif DB_K1:
                tl.atomic_add(DBias + dbias_off + i * sdbm, tl.sum(dst, 0), mask=i < n_queries)
            else:
                db_ptrs = DBias + dbias_off + i[None, :] * sdbm + j[:, None] * sdbn
                db_valid = (i[None, :] < n_queries) & (j[:, None] < n_keys)
                if DB_ATOMIC:
                    tl.atomic_add(db_ptrs, dst, mask=db_valid)
                else:
                    tl.store(db_ptrs, dst.to(DBias.dtype.element_ty), mask=db_valid)
        if SOFTCAP:
            dst = dst * (1.0 - t * t)
        # -- dK += dS^T Q (scale applied once at the end) ----
        dk = _dot(dst.to(qt.dtype), tl.trans(qt), dk, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, dO, Stats, Delta, Bias, Mask, Seed, DBias, dK, dV,
                 sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                 sbb, sbh, sbm, sbn, smb, smh, smm, smn, sdbb, sdbh, sdbm, sdbn,
                 n_heads, n_kv_heads, n_queries, n_keys, group, n_stats, scale, softcap, mask_value, left, right, dropout_p,
                 N_BUCKET, CASE,
                 D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, RAW: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
                 DB_Q1: tl.constexpr, DB_K1: tl.constexpr, DB_ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hkv = (pid_bh % n_kv_heads).to(tl.int64)
    n0 = pid_n * BLOCK_N
    j = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    shift = n_keys - n_queries
    # load k, v: they stay in registers throughout
    kv_valid = j[:, None] < n_keys
    k = tl.load(K + b * skb + hkv * skh + j[:, None] * skn + offs_d[None, :] * skd,
                mask=kv_valid & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hkv * svh + j[:, None] * svn + offs_dv[None, :] * svd,
                mask=kv_valid & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DV], tl.float32)
    # query ranges of this key block: the band seen from the keys' side
    lo, mid_lo, mid_hi, hi = _band(n0, n_queries, -shift, right, left, HAS_RIGHT, HAS_LEFT, BLOCK_N, BLOCK_M)
    if n0 + BLOCK_N > n_keys:
        mid_hi = mid_lo  # a ragged key block masks every query block
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    for g in range(0, group):
        h = hkv * group + g
        row0 = (b * n_heads + h) * n_queries
        q_h = Q + b * sqb + h * sqh
        do_h = dO + b * sdb + h * sdh
        bias_off = b * sbb + h * sbh
        mask_off = b * smb + h * smh
        dbias_off = b * sdbb + h * sdbh
        # stage 1: queries right of the band's full blocks (diagonal, window edge); 2: mask-free; 3: the rest
        dk, dv = _dkdv_inner(dk, dv, k, v, j, lo, mid_lo, q_h, do_h, Stats, n_stats, Delta, sqm, sqd, sdm, sdd, row0,
                             Bias, bias_off, sbm, sbn, Mask, mask_off, smm, smn, DBias, dbias_off, sdbm, sdbn, seed,
                             n_queries, n_keys, shift, left, right, scale, softcap, mask_value, dropout_p,
                             D, DV, HEAD_D, HEAD_DV, BLOCK_M, HAS_BIAS, HAS_MASK, SOFTCAP, RAW, HAS_LEFT, HAS_RIGHT,
                             DROPOUT, BIAS_GRAD, DB_Q1, DB_K1, DB_ATOMIC, True, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, j, mid_lo, mid_hi, q_h, do_h, Stats, n_stats, Delta, sqm, sqd, sdm, sdd, row0,
                             Bias, bias_off, sbm, sbn, Mask, mask_off, smm, smn, DBias, dbias_off, sdbm, sdbn, seed,
                             n_queries, n_keys, shift, left, right, scale, softcap, mask_value, dropout_p,
                             D, DV, HEAD_D, HEAD_DV, BLOCK_M, HAS_BIAS, HAS_MASK, SOFTCAP, RAW, HAS_LEFT, HAS_RIGHT,
                             DROPOUT, BIAS_GRAD, DB_Q1, DB_K1, DB_ATOMIC, False, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, j, mid_hi, hi, q_h, do_h, Stats, n_stats, Delta, sqm, sqd, sdm, sdd, row0,
                             Bias, bias_off, sbm, sbn, Mask, mask_off, smm, smn, DBias, dbias_off, sdbm, sdbn, seed,
                             n_queries, n_keys, shift, left, right, scale, softcap, mask_value, dropout_p,
                             D, DV, HEAD_D, HEAD_DV, BLOCK_M, HAS_BIAS, HAS_MASK, SOFTCAP, RAW, HAS_LEFT, HAS_RIGHT,
                             DROPOUT, BIAS_GRAD, DB_Q1, DB_K1, DB_ATOMIC, True, PRECISION)
    # epilogue: dK picks up the score scale here, once
    dk = dk * scale
    out_row = pid_bh.to(tl.int64) * n_keys + j
    tl.store(dK + out_row[:, None] * D + offs_d[None, :], dk.to(dK.dtype.element_ty),
             mask=kv_valid & (offs_d[None, :] < D))
    tl.store(dV + out_row[:, None] * DV + offs_dv[None, :], dv.to(dV.dtype.element_ty),
             mask=kv_valid & (offs_dv[None, :] < DV))


_KEY = ["N_BUCKET", "CASE", "HEAD_D", "HEAD_DV", "RAW", "HAS_BIAS"]
_dkdv_tuned = triton.autotune(configs.BWD_DKDV, key=_KEY + ["BIAS_GRAD"], reset_to_zero=["DBias"],
                              prune_configs_by={"early_config_prune": configs.prune})(_dkdv_kernel)
_dq_tuned = triton.autotune(configs.BWD_DQ, key=_KEY, prune_configs_by={"early_config_prune": configs.prune})(_dq_kernel)


def _launch(tuned, plain, kind, blocks, args, flags, head):
    """Run `plain` with the fixed config, or `tuned`; blocks(meta) -> grid."""
    if configs.FIXED:
        cfg = configs.default(kind, head)
        plain[blocks(cfg)](*args, **flags, **cfg)
    else:
        tuned[blocks](*args, **flags)


def backward(dout, q, k, v, bias, mask, out, stats, seed, spec, bias_grad):
    """Launch preprocess, dK/dV and dQ. mask is uint8; stats (2, B, Hq, Nq) as the forward wrote them, or a
    (B, Hq, Nq) log-sum-exp. Returns dq, dk, dv, dbias (or None)."""
    from flashfuse.kernels.flash_fwd import head_pad
    b, hq, nq, d = q.shape
    hkv, nk, dv_ = k.shape[1], k.shape[2], v.shape[-1]
    head_d, head_dv = head_pad(d), head_pad(dv_)
    if stats.dim() == 3:  # a log-sum-exp alone: max = lse, log-sum = 0
        stats = torch.stack([stats, torch.zeros_like(stats)])
    stats = stats.float().contiguous()
    delta = torch.empty(stats.shape[1:], dtype=torch.float32, device=q.device)
    pre_block = 32 if configs.INTERPRET else 64
    _bwd_preprocess[(triton.cdiv(nq, pre_block), b * hq)](out, dout, stats, delta, *out.stride(), *dout.stride(), hq, nq,
                                                           DV=dv_, HEAD_DV=head_dv, BLOCK_M=pre_block)
    dq = torch.empty((b, hq, nq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, hkv, nk, d), dtype=k.dtype, device=k.device)
    dv = torch.empty((b, hkv, nk, dv_), dtype=v.dtype, device=v.device)
    # dBias: the bias's shape; fp32 with atomics when a broadcast dim makes programs share elements
    bias_grad = bias_grad and bias is not None
    db_q1 = db_k1 = db_atomic = False
    if bias_grad:
        db_q1, db_k1 = bias.shape[2] == 1 and nq > 1, bias.shape[3] == 1 and nk > 1
        db_atomic = db_q1 or db_k1 or (bias.shape[0] == 1 and b > 1) or (bias.shape[1] == 1 and hq > 1)
        dbias = torch.zeros(bias.shape, dtype=torch.float32 if db_atomic else bias.dtype, device=q.device)
    else:
        dbias = torch.zeros(1, dtype=torch.float32, device=q.device)  # a stand-in the autotuner may zero
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *broadcast_strides(bias),
              *broadcast_strides(mask))
    bias_ = q if bias is None else bias
    mask_ = q if mask is None else mask
    seed_ = q if seed is None else seed
    scalars = (spec.scale, spec.softcap, spec.mask_value, spec.left, spec.right, spec.dropout_p,
               configs.length_bucket(max(nq, nk)), spec.case)
    flags = dict(D=d, DV=dv_, HEAD_D=head_d, HEAD_DV=head_dv, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
                 SOFTCAP=spec.softcap != 0.0, RAW=spec.raw, HAS_LEFT=spec.has_left, HAS_RIGHT=spec.has_right,
                 DROPOUT=spec.dropout_p > 0.0, PRECISION=precision(q.dtype))
    head = max(head_d, head_dv)
    _launch(_dkdv_tuned, _dkdv_kernel, "dkdv", lambda meta: (triton.cdiv(nk, meta["BLOCK_N"]), b * hkv),
            (q, k, v, dout, stats, delta, bias_, mask_, seed_, dbias, dk, dv, *common,
             *broadcast_strides(dbias if bias_grad else None), hq, hkv, nq, nk, hq // hkv, b * hq * nq, *scalars),
            dict(flags, BIAS_GRAD=bias_grad, DB_Q1=db_q1, DB_K1=db_k1, DB_ATOMIC=db_atomic), head)
    _launch(_dq_tuned, _dq_kernel, "dq", lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * hq),
            (q, k, v, dout, stats, delta, bias_, mask_, seed_, dq, *common, hq, nq, nk, hq // hkv, b * hq * nq, *scalars),
            flags, head)
    if not bias_grad:
        return dq, dk, dv, None
    return dq, dk, dv, dbias.to(bias.dtype)
