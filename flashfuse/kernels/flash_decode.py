"""Flash-decoding: few queries (Nq <= 16) over long keys, keys split across programs.

Each program owns one KV head, a tile of packed rows (every q head of the GQA group x every query: K/V are
read once per group) and one chunk of keys; it writes a normalized partial output, its row max and log-sum.
The combine kernel weighs the partials by exp(max_split - max + logsum_split) into the output and the row stats.
"""
import functools

import torch
import triton
import triton.language as tl

from flashfuse.kernels import configs
from flashfuse.kernels.flash_common import _kept_keys, broadcast_strides, constexprs, fill_argument
from flashfuse.kernels.flash_fwd import _fwd_epilogue, _fwd_inner, head_pad

MAX_QUERIES = 16


@triton.jit
def _decode_split_kernel(Q, K, V, Bias, Mask, Seed, OPart, MPart, LPart,
                         sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbb, sbh, sbm, sbn, smb, smh, smm, smn,
                         n_heads, group, n_queries, n_keys, chunk, mask_value,
                         SCALE: tl.constexpr, SOFTCAP: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                         DROPOUT_P: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                         RAW: tl.constexpr, PRECISION: tl.constexpr, MASK_KEYS: tl.constexpr,
                         SKIP_PADDING: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, HEAD_D: tl.constexpr,
                         HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # MASK_KEYS unused: a decode tile packs several heads' rows
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_kv_heads = n_heads // group
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hkv = (pid_bh % n_kv_heads).to(tl.int64)
    # packed rows r = g * Nq + i: q head hkv * group + g, query i
    r = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_rows = group * n_queries
    rc = tl.minimum(r, n_rows - 1)
    i = rc % n_queries
    h = hkv * group + rc // n_queries
    offs_d = tl.arange(0, HEAD_D)
    offs_dv = tl.arange(0, HEAD_DV)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqm + offs_d[None, :],
                mask=(r[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    row = (b * n_heads + h) * n_queries + i
    seed = 0
    if DROPOUT_P > 0.0:
        seed = tl.load(Seed)
    # this split's keys, narrowed to what any of the queries can see (every block masked: tiles are few)
    shift = n_keys - n_queries
    lo = 0
    hi = n_keys
    if LEFT >= 0:  # query 0's first key, floored to a block (chunks are whole blocks)
        lo = (tl.maximum(shift - LEFT, 0) // BLOCK_N) * BLOCK_N
    if RIGHT >= 0:  # one past query Nq - 1's last key
        hi = tl.minimum(n_keys, tl.maximum(n_queries + shift + RIGHT, 0))
    lo = tl.maximum(lo, split * chunk)
    hi = tl.minimum(hi, split * chunk + chunk)
    if SKIP_PADDING:  # the blocks that hold kept keys, when every head of the tile shares one padding row
        if smh == 0:
            kept_lo, kept_hi = _kept_keys(Mask + b * smb, smn, lo, hi)
            lo = tl.maximum(lo, (kept_lo // BLOCK_N) * BLOCK_N)
            hi = tl.minimum(hi, kept_hi)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DV], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, i, row, lo, hi, K + b * skb + hkv * skh, V + b * svb + hkv * svh,
                               skn, svn, Bias + b * sbb + h * sbh + i * sbm, sbn, Mask + b * smb + h * smh + i * smm,
                               smn, mask_value, seed, n_keys, shift, True, RAW, SCALE, SOFTCAP, LEFT, RIGHT,
                               DROPOUT_P, HAS_BIAS, HAS_MASK, PRECISION, D, DV, HEAD_D, HEAD_DV, BLOCK_N)
    # partials take dropout's 1 / (1 - p) (a weighted average keeps it) and keep empty rows as NaN for the combine
    out, m_i, log_sum = _fwd_epilogue(acc, l_i, m_i, RAW, SCALE, DROPOUT_P, False)
    total_rows = tl.num_programs(1).to(tl.int64) * group * n_queries
    part = split.to(tl.int64) * total_rows + row
    valid = r < n_rows
    tl.store(OPart + part[:, None] * DV + offs_dv[None, :], out, mask=valid[:, None] & (offs_dv[None, :] < DV))
    tl.store(MPart + part, m_i, mask=valid)
    tl.store(LPart + part, log_sum, mask=valid)


@triton.jit
def _decode_combine_kernel(OPart, MPart, LPart, Out, Stats, n_splits, EMPTY_ZERO: tl.constexpr, DV: tl.constexpr,
                           HEAD_DV: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    total_rows = tl.num_programs(0).to(tl.int64)
    s = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DV)
    part = s * total_rows + row
    m_s = tl.load(MPart + part, mask=s < n_splits, other=float("-inf"))
    logsum_s = tl.load(LPart + part, mask=s < n_splits, other=float("-inf"))
    m = tl.max(m_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    # split weights l_s * exp(m_s - m); 0 for splits that saw no key (m_s = -inf)
    w = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m_use + logsum_s))
    o = tl.load(OPart + part[:, None] * DV + d[None, :], mask=(s[:, None] < n_splits) & (d[None, :] < DV),
                other=0.0)
    o = tl.where(w[:, None] > 0.0, o, 0.0)  # their partials are 0/0
    l = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / l  # a row that saw no key: 0/0 = NaN, max = log-sum = -inf
    if EMPTY_ZERO:
        out = tl.where(l == 0.0, 0.0, out)
    tl.store(Out + row * DV + d, out.to(Out.dtype.element_ty), mask=d < DV)
    tl.store(Stats + row, m)
    tl.store(Stats + total_rows + row, tl.log(l))


def suits(q, k):
    """Decode shapes: a handful of queries per head."""
    return q.shape[2] <= MAX_QUERIES


@functools.lru_cache(maxsize=None)
def _sm_count(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def _splits(n_programs, n_blocks, device):
    """Enough key splits to fill about two waves of the GPU; three under the interpreter (to test combining)."""
    if configs.INTERPRET or device.type != "cuda":
        return min(n_blocks, 3)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_blocks, configs.cdiv(2 * sms, n_programs), 128))


def forward(q, k, v, bias, mask, seed, spec, launch):
    """Split-key forward; same contract as flash_fwd.forward."""
    b, hq, nq, d = q.shape
    hkv, nk, dv = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    head_d, head_dv = head_pad(d), head_pad(dv)
    cfg = configs.default("decode", max(head_d, head_dv))
    block_n = cfg.pop("BLOCK_N")
    block_m = max(16, min(64, configs.pow2(group * nq)))
    m_tiles = configs.cdiv(group * nq, block_m)
    n_blocks = max(1, configs.cdiv(nk, block_n))
    splits = _splits(b * hkv * m_tiles, n_blocks, q.device)
    chunk = configs.cdiv(n_blocks, splits) * block_n
    splits = max(1, configs.cdiv(nk, chunk))
    total_rows = b * hq * nq
    o_part = torch.empty((splits, total_rows, dv), dtype=torch.float32, device=q.device)
    m_part = torch.empty((splits, total_rows), dtype=torch.float32, device=q.device)
    l_part = torch.empty((splits, total_rows), dtype=torch.float32, device=q.device)
    # absent tensors' pointers: o_part, never read (not q; see flash_fwd.forward)
    launch(_decode_split_kernel, (splits, b * hkv, m_tiles))(
        q, k, v, o_part if bias is None else bias, o_part if mask is None else mask, o_part if seed is None else seed,
        o_part, m_part, l_part, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *broadcast_strides(bias),
        *broadcast_strides(mask), hq, group, nq, nk, chunk, fill_argument(spec),
        **constexprs(spec, bias, mask, q.dtype), D=d, DV=dv, HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_M=block_m,
        BLOCK_N=block_n, **cfg)
    out = torch.empty((b, hq, nq, dv), dtype=q.dtype, device=q.device)
    stats = torch.empty((2, b, hq, nq), dtype=torch.float32, device=q.device)
    launch(_decode_combine_kernel, (total_rows,))(
        o_part, m_part, l_part, out, stats, splits, EMPTY_ZERO=spec.empty_rows == "zero",
        DV=dv, HEAD_DV=head_dv, SPLITS=configs.pow2(splits))
    return out, stats
