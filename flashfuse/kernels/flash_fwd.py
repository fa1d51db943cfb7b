"""Flash-attention forward: one program per (BLOCK_M queries, batch, q head), streaming keys.

Online softmax in fp32 with exp2 and deferred normalization. The key range splits into three stages:
masked blocks left of the fully visible band (window), the mask-free band, and masked blocks on the
diagonal / right edge / ragged key tail. Fully hidden key blocks are never loaded.
"""
import torch
import triton
import triton.language as tl

from flashfuse.kernels import configs
from flashfuse.kernels.flash_common import _band, _dot, _dropout_keep, _score_tile, broadcast_strides, precision


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, i, row, lo, hi, K, V, skn, skd, svn, svd, Bias, bias_off, sbn, Mask, mask_off,
               smn, seed, n_keys, shift, left, right, scale, softcap, mask_value, dropout_p,
               D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
               RAW: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
               MASKED: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    qk_scale = scale * 1.4426950408889634
    # -inf can reach the running max only in masked tiles, or through a bias / finite-mask row
    SAFE: tl.constexpr = MASKED or HAS_BIAS or HAS_MASK
    for start in tl.range(lo, hi, BLOCK_N):
        j = start + offs_n
        # -- k^T: (HEAD_D, BLOCK_N), v: (BLOCK_N, HEAD_DV) ----
        kt_ptrs = K + offs_d[:, None] * skd + j[None, :] * skn
        v_ptrs = V + j[:, None] * svn + offs_dv[None, :] * svd
        if MASKED:
            kt = tl.load(kt_ptrs, mask=(offs_d[:, None] < D) & (j[None, :] < n_keys), other=0.0)
        elif D == HEAD_D:
            kt = tl.load(kt_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < D, other=0.0)
        qk = _dot(q, kt, None, PRECISION)
        s, _t, _keep = _score_tile(qk, i[:, None], j[None, :], n_keys, shift, left, right, scale, softcap,
                                   mask_value, Bias, bias_off[:, None], sbn, Mask, mask_off[:, None], smn,
                                   HAS_BIAS, HAS_MASK, SOFTCAP, RAW, HAS_LEFT, HAS_RIGHT, MASKED)
        # -- online softmax ----
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if SAFE:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        if RAW:
            p = tl.exp2(s * qk_scale - (m_use * qk_scale)[:, None])
            alpha = tl.exp2((m_i - m_use) * qk_scale)
        else:
            p = tl.exp2((s - m_use[:, None]) * 1.4426950408889634)
            alpha = tl.exp2((m_i - m_use) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, row, start, n_keys, dropout_p, BLOCK_N), p, 0.0)
        # -- acc += p @ v ----
        if MASKED:
            v = tl.load(v_ptrs, mask=(j[:, None] < n_keys) & (offs_dv[None, :] < DV), other=0.0)
        elif DV == HEAD_DV:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV, other=0.0)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Bias, Mask, Seed, Out, Stats,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
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
    # load q: it stays in registers throughout
    q_ptrs = Q + b * sqb + h * sqh + i[:, None] * sqm + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=(i[:, None] < n_queries) & (offs_d[None, :] < D), other=0.0)
    K += b * skb + hkv * skh
    V += b * svb + hkv * svh
    # bias / mask rows: clamped query index, so edge rows load in bounds without a mask
    ic = tl.minimum(i, n_queries - 1)
    bias_off = b * sbb + h * sbh + ic * sbm
    mask_off = b * smb + h * smh + ic * smm
    row = (b * n_heads + h) * n_queries + i
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV], tl.float32)
    lo, mid_lo, mid_hi, hi = _band(m0, n_keys, shift, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    # stage 1: masked blocks left of the visible band (window only)
    if HAS_LEFT:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, i, row, lo, mid_lo, K, V, skn, skd, svn, svd, Bias, bias_off,
                                   sbn, Mask, mask_off, smn, seed, n_keys, shift, left, right, scale, softcap,
                                   mask_value, dropout_p, D, DV, HEAD_D, HEAD_DV, BLOCK_N, HAS_BIAS, HAS_MASK,
                                   SOFTCAP, RAW, HAS_LEFT, HAS_RIGHT, DROPOUT, True, PRECISION)
    # stage 2: the band every query of the block sees: no masks
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, i, row, mid_lo, mid_hi, K, V, skn, skd, svn, svd, Bias, bias_off,
                               sbn, Mask, mask_off, smn, seed, n_keys, shift, left, right, scale, softcap,
                               mask_value, dropout_p, D, DV, HEAD_D, HEAD_DV, BLOCK_N, HAS_BIAS, HAS_MASK,
                               SOFTCAP, RAW, HAS_LEFT, HAS_RIGHT, DROPOUT, False, PRECISION)
    # stage 3: the diagonal, the right window edge and the ragged key tail
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, i, row, mid_hi, hi, K, V, skn, skd, svn, svd, Bias, bias_off,
                               sbn, Mask, mask_off, smn, seed, n_keys, shift, left, right, scale, softcap,
                               mask_value, dropout_p, D, DV, HEAD_D, HEAD_DV, BLOCK_N, HAS_BIAS, HAS_MASK,
                               SOFTCAP, RAW, HAS_LEFT, HAS_RIGHT, DROPOUT, True, PRECISION)
    # epilogue: a row that saw no key has l = 0 and m = -inf: out 0/0 = NaN, as the formula gives
    out = acc / l_i[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    if RAW:
        m_i = m_i * scale
    o_ptrs = Out + pid_bh.to(tl.int64) * n_queries * DV + i[:, None] * DV + offs_dv[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(i[:, None] < n_queries) & (offs_dv[None, :] < DV))
    # stats (2, B, Hq, Nq): the row max and the log-sum apart (a max near -3.4e38 would swallow the log-sum)
    stat_ptrs = Stats + pid_bh.to(tl.int64) * n_queries + i
    tl.store(stat_ptrs, m_i, mask=i < n_queries)
    tl.store(stat_ptrs + n_stats, tl.log(l_i), mask=i < n_queries)


_fwd_tuned = triton.autotune(configs.FWD, key=["N_BUCKET", "CASE", "HEAD_D", "HEAD_DV", "RAW", "HAS_BIAS"],
                             prune_configs_by={"early_config_prune": configs.prune})(_fwd_kernel)


def head_pad(d):
    """Padded tile width of a head dim. On GPUs at least 64: Triton 3.6's Hopper wgmma path read shared memory
    out of bounds (illegal address) with a 32-wide V tile (d 40 / dv 24 on an H200); masked loads keep the
    padding at zero, so only its arithmetic is wasted."""
    return max(16 if configs.INTERPRET else 64, triton.next_power_of_2(d))


def forward(q, k, v, bias, mask, seed, spec):
    """Launch the forward kernel. mask is uint8 (see flash_common.as_bytes). Returns out, stats (fp32)."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty((b, hq, nq, dv), dtype=q.dtype, device=q.device)
    stats = torch.empty((2, b, hq, nq), dtype=torch.float32, device=q.device)
    head_d, head_dv = head_pad(d), head_pad(dv)
    args = (q, k, v, q if bias is None else bias, q if mask is None else mask, q if seed is None else seed, out, stats,
            *q.stride(), *k.stride(), *v.stride(), *broadcast_strides(bias), *broadcast_strides(mask),
            hq, nq, nk, hq // hkv, b * hq * nq, spec.scale, spec.softcap, spec.mask_value, spec.left, spec.right, spec.dropout_p,
            configs.length_bucket(max(nq, nk)), spec.case)
    flags = dict(D=d, DV=dv, HEAD_D=head_d, HEAD_DV=head_dv, HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
                 SOFTCAP=spec.softcap != 0.0, RAW=spec.raw, HAS_LEFT=spec.has_left, HAS_RIGHT=spec.has_right,
                 DROPOUT=spec.dropout_p > 0.0, PRECISION=precision(q.dtype))
    if configs.FIXED:
        cfg = configs.default("fwd", max(head_d, head_dv), spec.case)
        grid = (triton.cdiv(nq, cfg["BLOCK_M"]), b * hq)
        _fwd_kernel[grid](*args, **flags, **cfg)
    else:
        grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * hq)  # noqa: E731
        _fwd_tuned[grid](*args, **flags)
    return out, stats
