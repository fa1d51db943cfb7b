"""Reference attention: the oracle (`naive`) and the portable blockwise implementation.

Every implementation of the op computes, for q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv):

    s = scale * q @ k^T                       (fp32)
    s = softcap * tanh(s / softcap)           (if softcap)
    s = s + bias                              (if bias; broadcast to (B, Hq, Nq, Nk))
    s = where(mask, s, mask_value)            (if mask; True keeps the key)
    s = -inf where causal or window hides the key (bottom-right aligned, see `visible`)
    p = softmax(s, -1); p = dropout(p)
    out = p @ v                               (q's dtype)

and the row statistics `stats` (2, B, Hq, Nq) in fp32: stats[0] the row max of s, stats[1] the log of
sum(exp(s - max)), so logsumexp(s) = stats[0] + stats[1]. They are kept apart because a row whose
keys are all filled with a huge finite value (finfo.min: a padded query) has a max near -3.4e38,
where adding the log of the sum is lost to rounding; the backward needs both to recompute p.
A row whose every key is -inf gives NaN, as the formula does, with stats[0] = -inf.

`naive` materializes the (Nq, Nk) scores in float64; tests and benchmarks share it.
`forward` / `backward` run blockwise over keys with an online softmax, so extra memory is
O(N * KEY_BLOCK), never N x N; on the CPU they take aten's fused kernel when the spec allows.
"""
import torch

KEY_BLOCK = 512


def visible(nq, nk, causal, window_left, window_right, device, k_start=0, k_end=None):
    """Bool (nq, k_end - k_start) of keys a query may see, or None when every key is visible.

    Query i is aligned with key i + nk - nq (bottom-right), so a single decode query sees every key.
    """
    left = window_left
    right = window_right
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return None
    k_end = nk if k_end is None else k_end
    i = torch.arange(nq, device=device)[:, None] + (nk - nq)
    j = torch.arange(k_start, k_end, device=device)[None, :]
    keep = torch.ones(nq, k_end - k_start, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def _expand_kv(t, hq):
    b, hkv, n, d = t.shape
    if hkv == hq:
        return t
    return t[:, :, None].expand(b, hkv, hq // hkv, n, d).reshape(b, hq, n, d)


def _key_slice(t, start, end):
    return t if t.shape[-1] == 1 else t[..., start:end]


def _scores(q, k, bias, mask, scale, softcap, mask_value, causal, window_left, window_right, k_start, k_end):
    """Scores for keys [k_start, k_end) in fp32 (or q's dtype when it is float64)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kb = _expand_kv(k, q.shape[1])[:, :, k_start:k_end]
    s = torch.matmul(q.to(acc), kb.to(acc).transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + _key_slice(bias, k_start, k_end).to(acc)
    if mask is not None:
        s = s.masked_fill(~_key_slice(mask, k_start, k_end), mask_value)
    keep = visible(q.shape[2], k.shape[2], causal, window_left, window_right, q.device, k_start, k_end)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return s


def dropout_keep(seed, shape, dropout_p, device, k_start=0, k_end=None):
    """Keep-mask of the reference dropout for keys [k_start, k_end): one generator per key block."""
    b, h, nq, nk = shape
    k_end = nk if k_end is None else k_end
    cols = []
    for start in range(k_start - k_start % KEY_BLOCK, k_end, KEY_BLOCK):
        gen = torch.Generator(device="cpu").manual_seed(int(seed.reshape(-1)[0]) * 1_000_003 + start)
        width = min(KEY_BLOCK, nk - start)
        cols.append(torch.rand(b, h, nq, width, generator=gen) >= dropout_p)
    keep = torch.cat(cols, dim=-1)
    off = k_start % KEY_BLOCK
    return keep[..., off:off + (k_end - k_start)].to(device)


def naive(q, k, v, bias=None, mask=None, *, scale=None, softcap=0.0, mask_value=float("-inf"), causal=False,
          window_left=-1, window_right=-1, dropout_keep_mask=None, dropout_p=0.0):
    """The oracle: the formula above on float64 copies, N x N scores materialized. Returns float64."""
    q, k, v = q.double(), k.double(), v.double()
    bias = None if bias is None else bias.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = _scores(q, k, bias, mask, scale, softcap, mask_value, causal, window_left, window_right, 0, k.shape[2])
    p = torch.softmax(s, dim=-1)
    if dropout_keep_mask is not None:
        p = p * dropout_keep_mask / (1.0 - dropout_p)
    return torch.matmul(p, _expand_kv(v, q.shape[1]))


def _sum_to(t, shape):
    """Reduce a full-shape gradient over the dims that were broadcast (size 1 in `shape`)."""
    dims = [i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _cpu_fused_ok(q, k, v, bias, mask, softcap, causal, window_left, window_right, dropout_p, bias_grad=False):
    """aten's fused CPU kernel covers: no mask, softcap, window or dropout; causal only when Nq == Nk; Dv == D."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and v.shape[-1] == q.shape[-1]
            and mask is None and not softcap and dropout_p == 0.0 and window_left < 0 and window_right < 0
            and (not causal or q.shape[2] == k.shape[2])
            and (bias is None or (bias.dtype == q.dtype and not bias_grad)))


def _fused_args(q, k, v, bias):
    """aten's kernel wants K/V expanded to q's heads, the bias full-size, and unit last-dim strides."""
    hq = q.shape[1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, _expand_kv(k, hq), _expand_kv(v, hq)))
    if bias is not None:
        bias = bias.expand(q.shape[0], hq, q.shape[2], k.shape[2])
    return q, k, v, bias


SATURATED = -1e8  # a finite row max beyond +-1e8 cannot carry its log-sum in one fp32 number
HUGE_FILL = -1e30  # fills this large swallow any score added to them in fp32


def _saturated(lse):
    return bool(((lse.abs() > -SATURATED) & torch.isfinite(lse)).any())


def _fused_stats(lse, bias, causal):
    """Row stats from aten's log-sum-exp, or None when a saturated row's stats cannot be recovered.

    A saturated row (a padded query: every key filled with ~finfo.min by the bias) has scores equal
    to the bias there, so its max is the bias row's max and its sum counts the keys at that max.
    """
    saturated = (lse.abs() > -SATURATED) & torch.isfinite(lse)
    if not bool(saturated.any()):
        return torch.stack([lse, torch.zeros_like(lse)])
    if bias is None or causal:
        return None
    row_max = bias.amax(-1).to(lse.dtype).expand_as(lse)
    if not bool((row_max[saturated] <= HUGE_FILL).all()):
        return None
    count = (bias == bias.amax(-1, keepdim=True)).sum(-1).to(lse.dtype).expand_as(lse)
    return torch.stack([torch.where(saturated, row_max, lse), torch.where(saturated, count.log(), 0.0)])


def forward(q, k, v, bias, mask, *, scale, softcap, mask_value, causal, window_left, window_right, dropout_p, seed):
    """Blockwise online-softmax forward. Returns out (B, Hq, Nq, Dv) in q's dtype and stats (2, B, Hq, Nq)."""
    nq, nk = q.shape[2], k.shape[2]
    if _cpu_fused_ok(q, k, v, bias, mask, softcap, causal, window_left, window_right, dropout_p):
        qx, kx, vx, bx = _fused_args(q, k, v, bias)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qx, kx, vx, 0.0, causal, attn_mask=bx, scale=scale)
        lse = lse.to(stats_dtype(q.dtype))
        stats = _fused_stats(lse, bias, causal)
        if stats is not None:
            return out, stats
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, hq, _, dv = *q.shape[:3], v.shape[-1]
    m = torch.full((b, hq, nq, 1), float("-inf"), dtype=acc, device=q.device)
    l = torch.zeros((b, hq, nq, 1), dtype=acc, device=q.device)
    o = torch.zeros((b, hq, nq, dv), dtype=acc, device=q.device)
    vx = _expand_kv(v, hq)
    for start in range(0, nk, KEY_BLOCK):
        end = min(start + KEY_BLOCK, nk)
        s = _scores(q, k, bias, mask, scale, softcap, mask_value, causal, window_left, window_right, start, end)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        # a row that has seen only -inf keeps m = -inf; shift by 0 there so exp() stays 0, not NaN
        shift = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - shift)
        alpha = torch.exp(m - shift)
        l = l * alpha + p.sum(-1, keepdim=True)
        if dropout_p > 0.0:
            p = p * dropout_keep(seed, (b, hq, nq, nk), dropout_p, q.device, start, end) / (1.0 - dropout_p)
        o = o * alpha + torch.matmul(p, vx[:, :, start:end].to(acc))
        m = m_new
    stats = torch.stack([m.squeeze(-1), torch.log(l).squeeze(-1)]).to(stats_dtype(q.dtype))
    return (o / l).to(q.dtype), stats


def backward(dout, q, k, v, bias, mask, out, stats, *, scale, softcap, mask_value, causal, window_left,
             window_right, dropout_p, seed, bias_grad):
    """Blockwise backward, recomputing p from stats. Returns dq, dk, dv (shapes of q, k, v) and dbias or None."""
    nq, nk = q.shape[2], k.shape[2]
    lse = stats[0] + stats[1]
    if _cpu_fused_ok(q, k, v, bias, mask, softcap, causal, window_left, window_right, dropout_p, bias_grad) \
            and not _saturated(lse):
        qx, kx, vx, bx = _fused_args(q, k, v, bias)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), qx, kx, vx, out, lse, 0.0, causal, attn_mask=bx, scale=scale)
        return dq, _group_sum(dk, k.shape[1]), _group_sum(dv, k.shape[1]), None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, hq = q.shape[:2]
    hkv = k.shape[1]
    do = dout.to(acc)
    delta = (do * out.to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O): (B, Hq, Nq, 1)
    row_max, log_sum = stats[0].to(acc)[..., None], stats[1].to(acc)[..., None]
    # rows that saw no key (max -inf) get p = 0, so nothing leaks into the gradients
    empty = torch.isneginf(row_max)
    row_max = torch.where(empty, torch.full_like(row_max, float("inf")), row_max)
    log_sum = torch.where(empty, torch.zeros_like(log_sum), log_sum)
    kx, vx = _expand_kv(k, hq).to(acc), _expand_kv(v, hq).to(acc)
    qa = q.to(acc)
    dq = torch.zeros_like(qa)
    dk = torch.zeros(b, hq, nk, q.shape[-1], dtype=acc, device=q.device)
    dv = torch.zeros(b, hq, nk, v.shape[-1], dtype=acc, device=q.device)
    dbias = torch.zeros(bias.shape, dtype=acc, device=q.device) if bias_grad else None
    for start in range(0, nk, KEY_BLOCK):
        end = min(start + KEY_BLOCK, nk)
        s = _scores(q, k, bias, mask, scale, softcap, mask_value, causal, window_left, window_right, start, end)
        p = torch.exp((s - row_max) - log_sum)
        dp = torch.matmul(do, vx[:, :, start:end].transpose(-1, -2))
        if dropout_p > 0.0:
            keep = dropout_keep(seed, (b, hq, nq, nk), dropout_p, q.device, start, end) / (1.0 - dropout_p)
            dv[:, :, start:end] += torch.matmul((p * keep).transpose(-1, -2), do)
            dp = dp * keep
        else:
            dv[:, :, start:end] += torch.matmul(p.transpose(-1, -2), do)
        ds = p * (dp - delta)  # gradient w.r.t. the post-bias scores
        if mask is not None:  # a filled score is a constant: nothing flows back through it
            ds = ds.masked_fill(~_key_slice(mask, start, end), 0.0)
        if bias_grad:
            if bias.shape[-1] == 1:
                dbias += _sum_to(ds, bias.shape)
            else:
                dbias[..., start:end] += _sum_to(ds, bias.shape[:-1] + (end - start,))
        if softcap:
            raw = torch.matmul(qa, kx[:, :, start:end].transpose(-1, -2)) * scale
            ds = ds * (1.0 - torch.tanh(raw / softcap) ** 2)
        ds = ds * scale
        dq += torch.matmul(ds, kx[:, :, start:end])
        dk[:, :, start:end] += torch.matmul(ds.transpose(-1, -2), qa)
    dk, dv = _group_sum(dk, hkv), _group_sum(dv, hkv)
    dbias = None if dbias is None else dbias.to(bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


def _group_sum(t, hkv):
    """(B, Hq, N, D) gradient of an expanded K/V -> (B, Hkv, N, D), summed over each group."""
    b, hq, n, d = t.shape
    if hq == hkv:
        return t
    return t.reshape(b, hkv, hq // hkv, n, d).sum(2)


def stats_dtype(dtype):
    """The row statistics are fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
