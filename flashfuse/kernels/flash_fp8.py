"""FP8 flash-attention forward (inference): q, k, v in float8_e4m3fn with their scales (fp8.py), products on
FP8 tensor cores with fp32 accumulation, P quantized to e4m3 for P.V, output in q's dtype.

The same online softmax, stages and score rules as flash_fwd.py (causal, window, masks and key padding, GQA,
softcap through flash_common._score_tile); no bias, no dropout, no backward. Scores: (q8 . k8) * q_scale[i] *
k_scale[j] in q.k units. P is at most 1; it is quantized as P * 2^P_LOG2 (a power of two, so exact to undo) so
that small weights keep e4m3's normal precision instead of its subnormals; the row sums carry the same factor, so
the output's column d is divided by the row's sum and multiplied by v's channel scale once, at the end.
"""
import torch
import triton
import triton.language as tl

from flashfuse.kernels import configs, fp8
from flashfuse.kernels.flash_common import (
    INTERPRET,
    LOG2E,
    _band,
    _query_block,
    _score_tile,
    _stage,
    broadcast_strides,
    constexprs,
    fill_argument,
)
from flashfuse.kernels.flash_fwd import head_pad
from flashfuse.kernels.fp8 import to_e4m3  # by name: inductor's copy of a kernel resolves no module attributes

P_LOG2: tl.constexpr = tl.constexpr(8.0)  # P * 2^8 <= 256 < E4M3_MAX
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _fp8_inner(acc, l_i, m_i, q, q_scale, i, lo, hi, K8, K_scale, V8t, mask_rows, smn, mask_value,
               n_keys, shift, MASKED: tl.constexpr, RAW: tl.constexpr, SCALE: tl.constexpr, SOFTCAP: tl.constexpr,
               LEFT: tl.constexpr, RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, EXACT: tl.constexpr,
               D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Keys [lo, hi) into the running (acc, l_i, m_i) of queries i. K8: this kv head's (Nk, D) fp8 keys; V8t its
    (Dv, Nk) fp8 values, keys contiguous; K_scale its (Nk,) key scales. RAW: q_scale holds SCALE * LOG2E too and
    m_i is in log2 units, so a score costs one multiply (by its key's scale) before the exp2's fused multiply-add;
    else m_i is in score units. Either way p carries the factor 2^P_LOG2 into P.V and l_i."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    SAFE: tl.constexpr = MASKED or HAS_MASK
    for start in tl.range(lo, hi, BLOCK_N):
        j = start + offs_n
        in_keys = j < n_keys
        kt = tl.load(K8 + offs_d[:, None] + j[None, :] * D, mask=(offs_d[:, None] < D) & in_keys[None, :],
                     other=0.0)
        k_scale = tl.load(K_scale + j, mask=in_keys, other=0.0)
        qk = tl.dot(q, kt) * k_scale[None, :]
        if not RAW:
            qk = qk * q_scale[:, None]
        mask_ptrs = mask_rows[:, None] + j[None, :] * smn
        s, _t, _keep = _score_tile(qk, i[:, None], j[None, :], n_keys, shift, mask_ptrs, mask_ptrs, mask_value,
                                   MASKED, RAW, SCALE, SOFTCAP, LEFT, RIGHT, False, HAS_MASK)  # no bias to read
        if RAW:  # q_scale > 0, so the row max commutes with it
            m_new = tl.maximum(m_i, tl.max(s, 1) * q_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        if SAFE:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        if RAW:
            p = tl.exp2(s * q_scale[:, None] - (m_use - P_LOG2)[:, None])
            alpha = tl.exp2(m_i - m_use)
        else:
            p = tl.exp2((s - m_use[:, None]) * LOG2E + P_LOG2)
            alpha = tl.exp2((m_i - m_use) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V8t + j[:, None] + offs_dv[None, :] * n_keys, mask=in_keys[:, None] & (offs_dv[None, :] < DV),
                     other=0.0)  # (BLOCK_N, HEAD_DV), keys contiguous in memory
        acc = acc * alpha[:, None]
        acc = tl.dot(to_e4m3(p, EXACT), vt, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fp8_fwd_kernel(Q8, Q_scale, K8, K_scale, V8t, V_scale, Mask, Out, Stats,
                    smb, smh, smm, smn, n_heads, group, n_queries, n_keys, mask_value,
                    SCALE: tl.constexpr, SOFTCAP: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                    HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr, RAW: tl.constexpr, EMPTY_ZERO: tl.constexpr,
                    EXACT: tl.constexpr,
                    D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, b, h, hkv, m0, i = _query_block(n_heads, group, RIGHT, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    shift = n_keys - n_queries
    rows = pid_bh.to(tl.int64) * n_queries + i  # q8, its scales, out and stats are contiguous (B * Hq, Nq, ...)
    q = tl.load(Q8 + rows[:, None] * D + offs_d[None, :], mask=(i[:, None] < n_queries) & (offs_d[None, :] < D),
                other=0.0)
    q_scale = tl.load(Q_scale + rows, mask=i < n_queries, other=1.0)
    if RAW:
        q_scale = q_scale * (SCALE * LOG2E)
    ic = tl.minimum(i, n_queries - 1)
    if MASK_KEYS:
        mask_rows = Mask + b * smb + h * smh + tl.zeros([1], tl.int64)
    else:
        mask_rows = Mask + b * smb + h * smh + ic * smm
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV], tl.float32)
    lo, mid_lo, mid_hi, hi = _band(m0, n_keys, shift, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    kv = b * (n_heads // group) + hkv  # k8 (B, Hkv, Nk, D), v8t (B, Hkv, Dv, Nk) and their scales are contiguous
    for stage in tl.static_range(3):
        start, end = _stage(stage, lo, mid_lo, mid_hi, hi)
        acc, l_i, m_i = _fp8_inner(acc, l_i, m_i, q, q_scale, i, start, end, K8 + kv * n_keys * D,
                                   K_scale + kv * n_keys, V8t + kv * DV * n_keys, mask_rows, smn, mask_value, n_keys,
                                   shift, stage != 1, RAW, SCALE, SOFTCAP, LEFT, RIGHT, HAS_MASK, EXACT, D, DV,
                                   HEAD_D, HEAD_DV, BLOCK_N)
    v_scale = tl.load(V_scale + kv * DV + offs_dv, mask=offs_dv < DV, other=0.0)
    out = acc * v_scale[None, :] / l_i[:, None]  # 2^P_LOG2 is in both
    if EMPTY_ZERO:
        out = tl.where(l_i[:, None] == 0.0, 0.0, out)
    tl.store(Out + rows[:, None] * DV + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=(i[:, None] < n_queries) & (offs_dv[None, :] < DV))
    n_rows = tl.num_programs(1).to(tl.int64) * n_queries
    if RAW:  # back to score units
        m_i = m_i * (1.0 / LOG2E)
    tl.store(Stats + rows, m_i, mask=i < n_queries)
    tl.store(Stats + n_rows + rows, tl.log(l_i) - P_LOG2 * LN2, mask=i < n_queries)


def forward(q, k, v, bias, mask, spec, launch):
    """Quantize q, k, v (fp8.py) and launch the FP8 forward. mask is uint8 or None. Returns out, stats (fp32)."""
    if bias is not None:
        raise ValueError("the FP8 path takes no bias: leave fp8 off for attention with a bias")
    b, hq, nq, _ = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    rotate = spec.fp8 == "incoherent"
    q8, q_scale = fp8.quantize(q, rotate, launch)
    k8, k_scale = fp8.quantize(k, rotate, launch)
    v8t, v_scale = fp8.quantize_v(v, launch)
    d = q8.shape[-1]
    out = torch.empty((b, hq, nq, dv), dtype=q.dtype, device=q.device)
    stats = torch.empty((2, b, hq, nq), dtype=torch.float32, device=q.device)
    head_d, head_dv = head_pad(d), head_pad(dv)
    cfg = configs.default("fp8", max(head_d, head_dv))
    grid = (configs.cdiv(nq, cfg["BLOCK_M"]), b * hq)
    flags = constexprs(spec, None, mask, q.dtype)
    launch(_fp8_fwd_kernel, grid)(
        q8, q_scale, k8, k_scale, v8t, v_scale, q8 if mask is None else mask, out, stats,
        *broadcast_strides(mask), hq, hq // hkv, nq, nk, fill_argument(spec),
        SCALE=flags["SCALE"], SOFTCAP=flags["SOFTCAP"], LEFT=flags["LEFT"], RIGHT=flags["RIGHT"],
        HAS_MASK=flags["HAS_MASK"], MASK_KEYS=flags["MASK_KEYS"], RAW=flags["RAW"],
        EMPTY_ZERO=spec.empty_rows == "zero", EXACT=INTERPRET, D=d, DV=dv, HEAD_D=head_d, HEAD_DV=head_dv, **cfg)
    return out, stats
