"""Flash-attention forward: one program per (BLOCK_M queries, batch, q head), streaming keys.

Online softmax in fp32 with exp2 and deferred normalization. The keys a query block sees split into three
stages (flash_common._stage): masked blocks left of the fully visible band (window), the mask-free band, and
masked blocks on the diagonal / right window edge / ragged key tail. Fully hidden key blocks are never loaded:
those the structure hides, and with SKIP_PADDING those key padding hides (flash_common).

empty_rows="average" (hidden_rows.py states the rule) is applied in the epilogue: a query block with a hidden row
reads all of v once more for the mean, so no fix-up kernel is launched after this one (flash_hidden.py does that
for the decode and FP8 kernels).
"""
import math

import torch
import triton
import triton.language as tl

from flashfuse.kernels import configs
from flashfuse.kernels.flash_common import (
    LOG2E,
    _band,
    _clip_band,
    _dot,
    _dropout_keep,
    _kept_keys,
    _query_block,
    _score_tile,
    _stage,
    broadcast_strides,
    constexprs,
    fill_argument,
)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, i, row, lo, hi, K, V, skn, svn, bias_rows, sbn, mask_rows, smn, mask_value, seed,
               n_keys, shift, MASKED: tl.constexpr, RAW: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
               LEFT: tl.constexpr, RIGHT: tl.constexpr, DROPOUT_P: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
               HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) into the running (acc, l_i, m_i) of queries i. K, V: this head's base pointers;
    bias_rows / mask_rows: pointers of each query's bias / mask row."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    # -inf can reach the running max only in masked tiles, or through a bias / finite-mask row
    SAFE: tl.constexpr = MASKED or HAS_BIAS or HAS_MASK
    for start in tl.range(lo, hi, BLOCK_N):
        j = start + offs_n
        # -- k^T: (HEAD_D, BLOCK_N), v: (BLOCK_N, HEAD_DV) ----
        kt_ptrs = K + offs_d[:, None] + j[None, :] * skn
        v_ptrs = V + j[:, None] * svn + offs_dv[None, :]
        if MASKED:
            kt = tl.load(kt_ptrs, mask=(offs_d[:, None] < D) & (j[None, :] < n_keys), other=0.0)
        elif D == HEAD_D:
            kt = tl.load(kt_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < D, other=0.0)
        qk = _dot(q, kt, None, PRECISION)
        s, _t, _keep = _score_tile(qk, i[:, None], j[None, :], n_keys, shift, bias_rows[:, None] + j[None, :] * sbn,
                                   mask_rows[:, None] + j[None, :] * smn, mask_value, MASKED, RAW, SCALE, SOFTCAP,
                                   LEFT, RIGHT, HAS_BIAS, HAS_MASK)
        # -- online softmax ----
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if SAFE:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        if RAW:
            p = tl.exp2(s * (SCALE * LOG2E) - (m_use * (SCALE * LOG2E))[:, None])
            alpha = tl.exp2((m_i - m_use) * (SCALE * LOG2E))
        else:
            p = tl.exp2((s - m_use[:, None]) * LOG2E)
            alpha = tl.exp2((m_i - m_use) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT_P > 0.0:
            p = tl.where(_dropout_keep(seed, row, start, n_keys, DROPOUT_P, BLOCK_N), p, 0.0)
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
def _fwd_epilogue(acc, l_i, m_i, RAW: tl.constexpr, SCALE: tl.constexpr, DROPOUT_P: tl.constexpr,
                  EMPTY_ZERO: tl.constexpr):
    """(out, row max in score units, log-sum). A row that saw no key has l = 0 and m = -inf: its out is
    0 / 0 = NaN as the formula gives, or 0 with EMPTY_ZERO."""
    out = acc / l_i[:, None]
    if EMPTY_ZERO:
        out = tl.where(l_i[:, None] == 0.0, 0.0, out)
    if DROPOUT_P > 0.0:
        out = out * (1.0 / (1.0 - DROPOUT_P))
    if RAW:
        m_i = m_i * SCALE
    return out, m_i, tl.log(l_i)


@triton.jit
def _hidden(m_i, valid, fill, FINITE_FILL: tl.constexpr):
    """Rows that saw no key: max -inf, or (FINITE_FILL) the mask's finite fill, so every key they saw was filled."""
    hidden = m_i == float("-inf")
    if FINITE_FILL:
        hidden = hidden | (m_i == fill)
    return hidden & valid


@triton.jit
def _mean_v(V, svn, n_keys, DV: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """mean(v) over all n_keys rows of one head's V, fp32 (HEAD_DV,)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, HEAD_DV)
    total = tl.zeros([BLOCK_N, HEAD_DV], tl.float32)
    for start in range(0, n_keys, BLOCK_N):
        j = start + offs_n
        total += tl.load(V + j[:, None] * svn + offs_dv[None, :],
                         mask=(j[:, None] < n_keys) & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
    return tl.sum(total, 0) / n_keys


@triton.jit
def _average_hidden(out, m_i, log_sum, valid, V, svn, n_keys, fill, FINITE_FILL: tl.constexpr, DV: tl.constexpr,
                    HEAD_DV: tl.constexpr, BLOCK_N: tl.constexpr):
    """(out, m, log-sum) with each hidden row set to mean(v), max -inf and log-sum 0, so that the backward treats
    it as empty (hidden_rows.py)."""
    hidden = _hidden(m_i, valid, fill, FINITE_FILL)
    if tl.sum(hidden.to(tl.int32), 0) > 0:
        mean = _mean_v(V, svn, n_keys, DV, HEAD_DV, BLOCK_N)
        out = tl.where(hidden[:, None], mean[None, :], out)
        m_i = tl.where(hidden, float("-inf"), m_i)
        log_sum = tl.where(hidden, 0.0, log_sum)
    return out, m_i, log_sum


@triton.jit
def _fwd_kernel(Q, K, V, Bias, Mask, Seed, Out, Stats, Res,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, smb, smh, smm, smn,
                n_heads, group, n_queries, n_keys, mask_value,
                SCALE: tl.constexpr, SOFTCAP: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                DROPOUT_P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, RAW: tl.constexpr,
                EMPTY_ROWS: tl.constexpr, PRECISION: tl.constexpr, MASK_KEYS: tl.constexpr,
                SKIP_PADDING: tl.constexpr, RESIDUAL: tl.constexpr, D: tl.constexpr,
                DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    pid_bh, b, h, hkv, m0, i = _query_block(n_heads, group, RIGHT, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    shift = n_keys - n_queries
    # load q: it stays in registers throughout
    q_ptrs = Q + b * sqb + h * sqh + i[:, None] * sqm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(i[:, None] < n_queries) & (offs_d[None, :] < D), other=0.0)
    # bias / mask rows: clamped query index, so edge rows load in bounds without a mask
    ic = tl.minimum(i, n_queries - 1)
    bias_rows = Bias + b * sbb + h * sbh + ic * sbm
    if MASK_KEYS:  # one mask row for every query: tiles load (1, BLOCK_N) and broadcast it
        mask_rows = Mask + b * smb + h * smh + tl.zeros([1], tl.int64)
    else:
        mask_rows = Mask + b * smb + h * smh + ic * smm
    row = (b * n_heads + h) * n_queries + i
    seed = 0
    if DROPOUT_P > 0.0:
        seed = tl.load(Seed)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV], tl.float32)
    lo, mid_lo, mid_hi, hi = _band(m0, n_keys, shift, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    if SKIP_PADDING:  # only the blocks that hold kept keys of this batch (flash_common)
        kept_lo, kept_hi = _kept_keys(Mask + b * smb + h * smh, smn, lo, hi)
        lo, mid_lo, mid_hi, hi = _clip_band(lo, mid_lo, mid_hi, hi, kept_lo, kept_hi, BLOCK_N)
    for stage in tl.static_range(3):  # stage 0 holds blocks only under a window (see flash_bwd on keeping it)
        start, end = _stage(stage, lo, mid_lo, mid_hi, hi)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, i, row, start, end, K + b * skb + hkv * skh,
                                   V + b * svb + hkv * svh, skn, svn, bias_rows, sbn, mask_rows, smn, mask_value,
                                   seed, n_keys, shift, stage != 1, RAW, SCALE, SOFTCAP, LEFT, RIGHT, DROPOUT_P,
                                   HAS_BIAS, HAS_MASK, PRECISION, D, DV, HEAD_D, HEAD_DV, BLOCK_N)
    out, m_i, log_sum = _fwd_epilogue(acc, l_i, m_i, RAW, SCALE, DROPOUT_P, EMPTY_ROWS == 1)
    if EMPTY_ROWS >= 2:
        out, m_i, log_sum = _average_hidden(out, m_i, log_sum, i < n_queries, V + b * svb + hkv * svh, svn, n_keys,
                                            mask_value, EMPTY_ROWS == 3, DV, HEAD_DV, BLOCK_N)
    o_offs = pid_bh.to(tl.int64) * n_queries * DV + i[:, None] * DV + offs_dv[None, :]
    o_valid = (i[:, None] < n_queries) & (offs_dv[None, :] < DV)
    rounded = out.to(Out.dtype.element_ty)
    tl.store(Out + o_offs, rounded, mask=o_valid)
    if RESIDUAL:  # what rounding lost, for the backward's delta (spec.fp32_delta)
        tl.store(Res + o_offs, (out - rounded.to(tl.float32)).to(Out.dtype.element_ty), mask=o_valid)
    # stats (2, B, Hq, Nq): the row max and the log-sum apart (a max near -3.4e38 would swallow the log-sum)
    stat_ptrs = Stats + pid_bh.to(tl.int64) * n_queries + i
    n_rows = tl.num_programs(1).to(tl.int64) * n_queries
    tl.store(stat_ptrs, m_i, mask=i < n_queries)
    tl.store(stat_ptrs + n_rows, log_sum, mask=i < n_queries)


def head_pad(d):
    """Padded tile width of a head dim. On GPUs at least 64: Triton 3.6's Hopper wgmma path read shared memory
    out of bounds (illegal address) with a 32-wide V tile (d 40 / dv 24 on an H200); masked loads keep the
    padding at zero, so only its arithmetic is wasted."""
    return max(16 if configs.INTERPRET else 64, configs.pow2(d))


def unit_last_stride(t):
    """The kernels index the head dim with stride 1; a rare other layout is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def empty_rows(spec):
    """EMPTY_ROWS: 0 the formula's NaN, 1 zero, 2 average the rows whose max is -inf, 3 also those whose max is the
    finite fill."""
    if spec.empty_rows != "average":
        return int(spec.empty_rows == "zero")
    return 3 if math.isfinite(spec.mask_value) else 2


def forward(q, k, v, bias, mask, seed, spec, launch, residual=None):
    """Launch the forward kernel. mask is uint8 (see flash_common.as_bytes). Returns out, stats (fp32); writes
    out's rounding residual into `residual` when given (contiguous, out's shape and dtype)."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    out = torch.empty((b, hq, nq, dv), dtype=q.dtype, device=q.device)
    stats = torch.empty((2, b, hq, nq), dtype=torch.float32, device=q.device)
    head_d, head_dv = head_pad(d), head_pad(dv)
    cfg = configs.default("fwd", max(head_d, head_dv))
    grid = (configs.cdiv(nq, cfg["BLOCK_M"]), b * hq)
    # absent tensors' pointers: out, never read. Not q: where q is computed in the graph (a rotary embedding, a
    # scale), inductor writes it into a buffer of its own for each argument it fills
    launch(_fwd_kernel, grid)(
        q, k, v, out if bias is None else bias, out if mask is None else mask, out if seed is None else seed, out,
        stats, out if residual is None else residual,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *broadcast_strides(bias), *broadcast_strides(mask),
        hq, hq // hkv, nq, nk, fill_argument(spec), **constexprs(spec, bias, mask, q.dtype),
        EMPTY_ROWS=empty_rows(spec), RESIDUAL=residual is not None,
        D=d, DV=dv, HEAD_D=head_d, HEAD_DV=head_dv, **cfg)
    return out, stats
