"""Flash-attention backward: the dK/dV kernel, and the launcher of dQ (flash_bwd_dq.py, which also writes
delta = rowsum(dO * O)) and then dK/dV: two launches.

No atomics on dQ/dK/dV. P is recomputed from the forward's row stats (max, log-sum). dK/dV programs own
BLOCK_N keys of one KV head and loop over the q heads of its group (GQA reduced in registers) and their
visible query blocks; they also write dBias, reduced over its broadcast dims (atomics only where a broadcast
dim makes programs share an element; relaxed, since nothing reads dBias before the launch ends: triton's default
acq_rel ordering had made a (B, 1, N, N) bias's backward 1.6x slower on an H200).
"""
import torch
import triton
import triton.language as tl

from flashfuse.kernels import configs
from flashfuse.kernels.flash_bwd_dq import _dq_kernel
from flashfuse.kernels.flash_common import (
    _band,
    _dot,
    _dropout_keep,
    _recompute_p,
    _row_stats,
    _score_tile,
    _stage,
    broadcast_strides,
    constexprs,
    fill_argument,
)
from flashfuse.kernels.flash_fwd import head_pad


@triton.jit
def _dkdv_inner(dk, dv, k, v, j, lo, hi, Q, dO, Stats, n_stats, Delta, sqm, sdm, row0, bias_cols, sbm, mask_cols,
                smm, mask_value, DBias, sdbm, sdbn, seed, n_queries, n_keys, shift, MASKED: tl.constexpr,
                RAW: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                DROPOUT_P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr,
                PRECISION: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr,
                HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BIAS_GRAD: tl.constexpr, DB_Q1: tl.constexpr,
                DB_K1: tl.constexpr, DB_ATOMIC: tl.constexpr):
    """Queries [lo, hi) of one q head into this key block's dk, dv. Q, dO: the head's base pointers; bias_cols /
    mask_cols: pointers of each key's bias / mask column at query 0; DBias: at this head and key 0."""
    offs_m = tl.arange(0, BLOCK_M)
    j0 = tl.min(j, 0)  # the first key of this block: dropout draws come in groups of 8 keys
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    for start in tl.range(lo, hi, BLOCK_M):
        i = start + offs_m
        # -- q^T: (HEAD_D, BLOCK_M), dO: (BLOCK_M, HEAD_DV) ----
        qt_ptrs = Q + offs_d[:, None] + i[None, :] * sqm
        do_ptrs = dO + i[:, None] * sdm + offs_dv[None, :]
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
        if MASK_KEYS:  # the key's mask entry serves every query: a (BLOCK_N, 1) tile
            mask_ptrs = mask_cols
        else:
            mask_ptrs = mask_cols + ic[None, :] * smm
        s, t, keep = _score_tile(qkt, i[None, :], j[:, None], n_keys, shift, bias_cols + ic[None, :] * sbm,
                                 mask_ptrs, mask_value, MASKED, RAW, SCALE, SOFTCAP, LEFT, RIGHT,
                                 HAS_BIAS, HAS_MASK)
        pt = _recompute_p(s, row_max[None, :], log_sum[None, :], RAW, SCALE)
        # -- dV += P^T dO; dP^T = V dO^T ----
        dpt = _dot(v, tl.trans(do), None, PRECISION)
        if DROPOUT_P > 0.0:
            kept = _dropout_keep(seed, row0 + i, j0, n_keys, DROPOUT_P, j.shape[0], True)
            inv = 1.0 / (1.0 - DROPOUT_P)
            dv = _dot(tl.where(kept, pt * inv, 0.0).to(do.dtype), do, dv, PRECISION)
            dpt = tl.where(kept, dpt * inv, 0.0)
        else:
            dv = _dot(pt.to(do.dtype), do, dv, PRECISION)
        # -- dS = P * (dP - delta): the gradient of the post-bias scores ----
        dst = pt * (dpt - delta[None, :])
        dbt = dst  # the bias's gradient: every key's when it is added after the fill (HAS_BIAS 2)
        if HAS_MASK == 1 or HAS_MASK == 2:  # a filled score is a constant (3: the fill was added; see spec.py)
            dst = tl.where(keep, dst, 0.0)
        if HAS_BIAS != 2:
            dbt = dst
        if BIAS_GRAD:
            if DB_Q1 and DB_K1:
                tl.atomic_add(DBias, tl.sum(tl.sum(dbt, 1), 0), sem="relaxed")
            elif DB_Q1:
                tl.atomic_add(DBias + j * sdbn, tl.sum(dbt, 1), mask=j < n_keys, sem="relaxed")
            elif DB_K1:
                tl.atomic_add(DBias + i * sdbm, tl.sum(dbt, 0), mask=i < n_queries, sem="relaxed")
            else:
                db_ptrs = DBias + i[None, :] * sdbm + j[:, None] * sdbn
                db_valid = (i[None, :] < n_queries) & (j[:, None] < n_keys)
                if DB_ATOMIC:
                    tl.atomic_add(db_ptrs, dbt, mask=db_valid, sem="relaxed")
                else:
                    tl.store(db_ptrs, dbt.to(DBias.dtype.element_ty), mask=db_valid)
        if SOFTCAP != 0.0:
            dst = dst * (1.0 - t * t)
        # -- dK += dS^T Q (scale applied once at the end) ----
        dk = _dot(dst.to(qt.dtype), tl.trans(qt), dk, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, dO, Stats, Delta, Bias, Mask, Seed, DBias, dK, dV,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdb, sdh, sdm, sbb, sbh, sbm, sbn, smb, smh, smm, smn,
                 sdbb, sdbh, sdbm, sdbn, n_heads, group, n_queries, n_keys, mask_value,
                 SCALE: tl.constexpr, SOFTCAP: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                 DROPOUT_P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, RAW: tl.constexpr,
                 PRECISION: tl.constexpr, MASK_KEYS: tl.constexpr, SKIP_PADDING: tl.constexpr, D: tl.constexpr,
                 DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BIAS_GRAD: tl.constexpr,
                 DB_Q1: tl.constexpr, DB_K1: tl.constexpr, DB_ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_kv_heads = n_heads // group
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hkv = (pid_bh % n_kv_heads).to(tl.int64)
    n0 = pid_n * BLOCK_N
    j = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    shift = n_keys - n_queries
    n_stats = tl.num_programs(1).to(tl.int64) * group * n_queries
    # load k, v: they stay in registers throughout
    kv_valid = j[:, None] < n_keys
    k = tl.load(K + b * skb + hkv * skh + j[:, None] * skn + offs_d[None, :],
                mask=kv_valid & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hkv * svh + j[:, None] * svn + offs_dv[None, :],
                mask=kv_valid & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_D], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DV], tl.float32)
    # query ranges of this key block: the band seen from the keys' side
    lo, mid_lo, mid_hi, hi = _band(n0, n_queries, -shift, RIGHT, LEFT, BLOCK_N, BLOCK_M)
    if n0 + BLOCK_N > n_keys:
        mid_hi = mid_lo  # a ragged key block masks every query block
    seed = 0
    if DROPOUT_P > 0.0:
        seed = tl.load(Seed)
    jc = tl.minimum(j, n_keys - 1)[:, None]
    for g in range(0, group):
        h = hkv * group + g
        row0 = (b * n_heads + h) * n_queries
        bias_cols = Bias + b * sbb + h * sbh + jc * sbn
        mask_cols = Mask + b * smb + h * smh + jc * smn
        g_lo, g_mid_lo, g_mid_hi, g_hi = lo, mid_lo, mid_hi, hi
        if SKIP_PADDING:  # keys the padding hides all get p = 0: their dk, dv are 0 (flash_common)
            kept = tl.load(Mask + b * smb + h * smh + j * smn, mask=j < n_keys, other=0) != 0
            if tl.max(kept.to(tl.int32), 0) == 0:
                g_mid_lo, g_mid_hi, g_hi = g_lo, g_lo, g_lo
        # stage 0: queries below the full blocks (the diagonal: only with a right bound); 1: mask-free;
        # 2: above them (window edge, ragged query tail). Stage 0 is emitted even when it is always empty:
        # leaving it out made ptxas schedule the mask-free loop worse (d128 non-causal on an H200: 2.75 ms
        # against 2.28 ms for the same kernel with it; docs/performance.md).
        for stage in tl.static_range(3):
            start, end = _stage(stage, g_lo, g_mid_lo, g_mid_hi, g_hi)
            dk, dv = _dkdv_inner(dk, dv, k, v, j, start, end, Q + b * sqb + h * sqh, dO + b * sdb + h * sdh,
                                 Stats, n_stats, Delta, sqm, sdm, row0, bias_cols, sbm, mask_cols, smm, mask_value,
                                 DBias + b * sdbb + h * sdbh, sdbm, sdbn, seed, n_queries, n_keys, shift,
                                 stage != 1, RAW, SCALE, SOFTCAP, LEFT, RIGHT, DROPOUT_P, HAS_BIAS, HAS_MASK,
                                 MASK_KEYS, PRECISION, D, DV, HEAD_D, HEAD_DV, BLOCK_M, BIAS_GRAD, DB_Q1, DB_K1,
                                 DB_ATOMIC)
    # epilogue: dK picks up the score scale here, once
    dk = dk * SCALE
    out_row = pid_bh.to(tl.int64) * n_keys + j
    tl.store(dK + out_row[:, None] * D + offs_d[None, :], dk.to(dK.dtype.element_ty),
             mask=kv_valid & (offs_d[None, :] < D))
    tl.store(dV + out_row[:, None] * DV + offs_dv[None, :], dv.to(dV.dtype.element_ty),
             mask=kv_valid & (offs_dv[None, :] < DV))


def backward(dout, q, k, v, bias, mask, seed, out, stats, spec, bias_grad, launch, dlse=None, residual=None):
    """Launch dQ (which writes delta), then dK/dV. mask is uint8; stats (2, B, Hq, Nq) as the forward wrote them;
    dlse (B, Hq, Nq) or None: the gradient of each row's logsumexp (it enters as delta - dlse); residual: out's
    rounding residual (spec.fp32_delta) or None.
    Returns dq, dk, dv, dbias (or None)."""
    b, hq, nq, d = q.shape
    hkv, nk, dv_ = k.shape[1], k.shape[2], v.shape[-1]
    head_d, head_dv = head_pad(d), head_pad(dv_)
    head = max(head_d, head_dv)
    stats = stats.float().contiguous()
    out = out.contiguous()
    if dlse is None:
        delta = torch.empty(stats.shape[1:], dtype=torch.float32, device=q.device)
    else:
        delta = -dlse.to(torch.float32).contiguous()
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
        dbias = delta  # a stand-in (never touched without BIAS_GRAD) that is no input of the op
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *broadcast_strides(bias),
               *broadcast_strides(mask))
    # absent tensors' pointers: dq, never read (not q; see flash_fwd.forward)
    tensors = (q, k, v, dout, stats, delta, dq if bias is None else bias, dq if mask is None else mask,
               dq if seed is None else seed)
    flags = dict(constexprs(spec, bias, mask, q.dtype), D=d, DV=dv_, HEAD_D=head_d, HEAD_DV=head_dv)
    cfg = configs.default("dq", head)
    launch(_dq_kernel, (configs.cdiv(nq, cfg["BLOCK_M"]), b * hq))(
        *tensors, dq, out, out if residual is None else residual.contiguous(), *strides, hq, hq // hkv, nq, nk,
        fill_argument(spec), **flags, **cfg, DELTA_IN=dlse is not None, RESIDUAL=residual is not None)
    cfg = configs.default("dkdv", head)
    launch(_dkdv_kernel, (configs.cdiv(nk, cfg["BLOCK_N"]), b * hkv))(
        *tensors, dbias, dk, dv, *strides, *broadcast_strides(dbias if bias_grad else None), hq, hq // hkv, nq, nk,
        fill_argument(spec), **flags, **cfg, BIAS_GRAD=bias_grad, DB_Q1=db_q1, DB_K1=db_k1, DB_ATOMIC=db_atomic)
    if not bias_grad:
        return dq, dk, dv, None
    return dq, dk, dv, dbias.to(bias.dtype)
