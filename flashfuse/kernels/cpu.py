"""The op on the CPU (and for float64 anywhere): blockwise over keys with an online softmax, so extra memory is
O(N * KEY_BLOCK), never N x N; aten's fused CPU kernel where the spec allows it.

Same contract as the Triton path (flash.py): `forward` returns out (B, Hq, Nq, Dv) in q's dtype and the row
stats (2, B, Hq, Nq): stats[0] the row max of the scores, stats[1] log(sum(exp(s - max))), so
logsumexp = stats[0] + stats[1]. They are kept apart because a row whose keys are all filled with a huge
finite value (finfo.min: a padded query) has a max near -3.4e38, where adding the log of the sum is lost to
rounding; the backward needs both to recompute p. A row whose every key is -inf has stats[0] = -inf.
"""
import torch

from flashfuse.kernels import empty, fp8, hidden_rows
from flashfuse.kernels.reference import repeat_kv, scores
from flashfuse.kernels.spec import HUGE_FILL

KEY_BLOCK = 512
SATURATED = -1e8  # a finite row max beyond +-1e8 cannot carry its log-sum in one fp32 number


def stats_dtype(dtype):
    """The row statistics are fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def dropout_scale(seed, shape, spec, device, start=0, end=None, dtype=torch.float32):
    """What the CPU path's dropout multiplies p by for keys [start, end) of a (B, Hq, Nq, Nk) problem: 0 for a
    dropped key, 1 / (1 - dropout_p) for a kept one. One generator per KEY_BLOCK keys, seeded from `seed`
    (int64 (1,)), so any block can be redrawn alone."""
    b, h, nq, nk = shape
    end = nk if end is None else end
    cols = []
    for block in range(start - start % KEY_BLOCK, end, KEY_BLOCK):
        gen = torch.Generator(device="cpu").manual_seed(int(seed.reshape(-1)[0]) * 1_000_003 + block)
        cols.append(torch.rand(b, h, nq, min(KEY_BLOCK, nk - block), generator=gen) >= spec.dropout_p)
    keep = torch.cat(cols, dim=-1)
    off = start % KEY_BLOCK
    return keep[..., off:off + (end - start)].to(device, dtype) / (1.0 - spec.dropout_p)


def _fused_ok(q, k, v, bias, mask, spec, bias_grad=False):
    """aten's fused CPU kernel covers: no mask, softcap, window or dropout; causal only when Nq == Nk; Dv == D; no
    fp32_delta (it keeps no fp32 output to take the residual from)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and v.shape[-1] == q.shape[-1] and mask is None and not spec.softcap and not spec.dropout_p
            and not spec.fp32_delta
            and spec.window == (-1, -1) and (not spec.causal or q.shape[2] == k.shape[2])
            and (bias is None or (bias.dtype == q.dtype and not bias_grad)))


def _fused_args(q, k, v, bias):
    """aten's kernel wants K/V expanded to q's heads, the bias full-size, and unit last-dim strides."""
    group = q.shape[1] // k.shape[1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, repeat_kv(k, group), repeat_kv(v, group)))
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return q, k, v, bias


def _saturated(lse):
    return (lse.abs() > -SATURATED) & torch.isfinite(lse)


def _fused_stats(lse, bias, causal, n_keys):
    """Row stats from aten's log-sum-exp, or None when a saturated row's stats cannot be recovered.

    A saturated row (a padded query: every key filled with ~finfo.min by the bias) has scores equal
    to the bias there, so its max is the bias row's max and its sum counts the keys at that max.
    """
    saturated = _saturated(lse)
    if not bool(saturated.any()):
        return torch.stack([lse, torch.zeros_like(lse)])
    if bias is None or causal:
        return None
    row_max = bias.amax(-1).to(lse.dtype).expand_as(lse)
    if not bool((row_max[saturated] <= HUGE_FILL).all()):
        return None
    count = (bias == bias.amax(-1, keepdim=True)).sum(-1).to(lse.dtype).expand_as(lse)
    if bias.shape[-1] == 1:  # a bias broadcast over the keys: every key sits at the max
        count = count * n_keys
    return torch.stack([torch.where(saturated, row_max, lse), torch.where(saturated, count.log(), 0.0)])


def _empty_rows_to_zero(out, row_max, spec):
    if spec.empty_rows != "zero":
        return out
    return out.masked_fill(torch.isneginf(row_max)[..., None], 0.0)


def forward(q, k, v, bias, mask, seed, spec, residual=None):
    """Blockwise online-softmax forward: out (B, Hq, Nq, Dv) in q's dtype and stats (2, B, Hq, Nq); out's rounding
    residual into `residual` when given (spec.fp32_delta). An FP8 spec runs on q, k, v as FP8 holds them
    (fp8.dequantized)."""
    if spec.fp8 and not empty.is_empty(q, k):
        qx, kx, vx = fp8.dequantized(q, k, v, spec)
        out, stats = forward(qx, kx, vx, bias, mask, seed, spec.replace(fp8=""))
        return out.to(q.dtype), stats.to(stats_dtype(q.dtype))
    out, stats = _forward(q, k, v, bias, mask, seed, spec, residual)
    return hidden_rows.finish_forward(out, stats, v, spec) if not empty.is_empty(q, k) else (out, stats)


def _forward(q, k, v, bias, mask, seed, spec, residual=None):
    if empty.is_empty(q, k):
        if residual is not None:
            residual.zero_()
        return empty.forward(q, k, v, stats_dtype(q.dtype))
    nq, nk = q.shape[2], k.shape[2]
    if _fused_ok(q, k, v, bias, mask, spec):
        qx, kx, vx, bx = _fused_args(q, k, v, bias)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qx, kx, vx, 0.0, spec.causal, attn_mask=bx, scale=spec.scale)
        stats = _fused_stats(lse.to(stats_dtype(q.dtype)), bias, spec.causal, nk)
        if stats is not None:
            return _empty_rows_to_zero(out, stats[0], spec), stats
    acc = _acc(q)
    b, hq, dv = q.shape[0], q.shape[1], v.shape[-1]
    m = torch.full((b, hq, nq, 1), float("-inf"), dtype=acc, device=q.device)
    l = torch.zeros((b, hq, nq, 1), dtype=acc, device=q.device)
    o = torch.zeros((b, hq, nq, dv), dtype=acc, device=q.device)
    vx = repeat_kv(v, hq // v.shape[1])
    for start in range(0, nk, KEY_BLOCK):
        end = min(start + KEY_BLOCK, nk)
        s = scores(q, k, spec, bias, mask, start, end)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        # a row that has seen only -inf keeps m = -inf; shift by 0 there so exp() stays 0, not NaN
        shift = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - shift)
        alpha = torch.exp(m - shift)
        l = l * alpha + p.sum(-1, keepdim=True)
        if spec.dropout_p:
            p = p * dropout_scale(seed, (b, hq, nq, nk), spec, q.device, start, end, acc)
        o = o * alpha + torch.matmul(p, vx[:, :, start:end].to(acc))
        m = m_new
    stats = torch.stack([m.squeeze(-1), torch.log(l).squeeze(-1)]).to(stats_dtype(q.dtype))
    o = _empty_rows_to_zero(o / l, stats[0], spec)
    out = o.to(q.dtype)
    if residual is not None:
        residual.copy_(o - out.to(o.dtype))
    return out, stats


def backward(dout, q, k, v, bias, mask, seed, out, stats, spec, bias_grad, dlse=None, residual=None):
    """Blockwise backward, recomputing p from stats. Returns dq, dk, dv (shapes of q, k, v) and dbias or None.
    dlse (B, Hq, Nq) or None: the gradient of the rows' logsumexp (stats[0] + stats[1]); residual: out's rounding
    residual (spec.fp32_delta) or None."""
    fp8.no_backward(spec)
    dq, dk, dv, dbias = _backward(dout, q, k, v, bias, mask, seed, out, stats, spec, bias_grad, dlse, residual)
    return (*hidden_rows.finish_backward((dq, dk, dv), dout, q, k, v, stats, spec), dbias)


def _backward(dout, q, k, v, bias, mask, seed, out, stats, spec, bias_grad, dlse=None, residual=None):
    if empty.is_empty(q, k):
        return empty.backward(q, k, v, bias, bias_grad)
    nq, nk = q.shape[2], k.shape[2]
    lse = stats[0] + stats[1]
    if dlse is None and _fused_ok(q, k, v, bias, mask, spec, bias_grad) and not bool(_saturated(lse).any()) \
            and not bool(torch.isneginf(lse).any()):
        qx, kx, vx, bx = _fused_args(q, k, v, bias)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), qx, kx, vx, out, lse, 0.0, spec.causal, attn_mask=bx, scale=spec.scale)
        return dq, _group_sum(dk, k.shape[1]), _group_sum(dv, k.shape[1]), None
    acc = _acc(q)
    b, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
    do = dout.to(acc)
    row_max, log_sum = stats[0].to(acc)[..., None], stats[1].to(acc)[..., None]
    # rows that saw no key (max -inf) get p = 0 and delta = 0, so nothing leaks into the gradients
    dead = torch.isneginf(row_max)
    o = out.to(acc) if residual is None else out.to(acc) + residual.to(acc)  # the fp32 output (spec.fp32_delta)
    delta = (do * o).sum(-1, keepdim=True)  # rowsum(dO * O): (B, Hq, Nq, 1)
    if dlse is not None:  # d logsumexp / d s = p: the row's gradient joins delta
        delta = delta - dlse.to(acc)[..., None]
    delta = torch.where(dead, 0.0, delta)
    row_max = torch.where(dead, torch.full_like(row_max, float("inf")), row_max)
    log_sum = torch.where(dead, torch.zeros_like(log_sum), log_sum)
    kx, vx = repeat_kv(k, hq // hkv).to(acc), repeat_kv(v, hq // hkv).to(acc)
    qa = q.to(acc)
    dq = torch.zeros_like(qa)
    dk = torch.zeros(b, hq, nk, q.shape[-1], dtype=acc, device=q.device)
    dv = torch.zeros(b, hq, nk, v.shape[-1], dtype=acc, device=q.device)
    dbias = torch.zeros(bias.shape, dtype=acc, device=q.device) if bias_grad else None
    for start in range(0, nk, KEY_BLOCK):
        end = min(start + KEY_BLOCK, nk)
        s = scores(q, k, spec, bias, mask, start, end)
        p = torch.exp((s - row_max) - log_sum)
        dp = torch.matmul(do, vx[:, :, start:end].transpose(-1, -2))
        if spec.dropout_p:
            keep = dropout_scale(seed, (b, hq, nq, nk), spec, q.device, start, end, acc)
            dv[:, :, start:end] += torch.matmul((p * keep).transpose(-1, -2), do)
            dp = dp * keep
        else:
            dv[:, :, start:end] += torch.matmul(p.transpose(-1, -2), do)
        ds = p * (dp - delta)  # gradient w.r.t. the scores the softmax takes
        ds_bias = ds  # a bias added after the fill (bias_last) gets every key's gradient
        if mask is not None and not spec.fill_adds:  # a filled score is a constant, unless the fill was added
            ds = ds.masked_fill(~(mask if mask.shape[-1] == 1 else mask[..., start:end]), 0.0)
        if not spec.bias_last:
            ds_bias = ds
        if bias_grad:
            if bias.shape[-1] == 1:
                dbias += _sum_to(ds_bias, bias.shape)
            else:
                dbias[..., start:end] += _sum_to(ds_bias, bias.shape[:-1] + (end - start,))
        if spec.softcap:
            raw = torch.matmul(qa, kx[:, :, start:end].transpose(-1, -2)) * spec.scale
            ds = ds * (1.0 - torch.tanh(raw / spec.softcap) ** 2)
        ds = ds * spec.scale
        dq += torch.matmul(ds, kx[:, :, start:end])
        dk[:, :, start:end] += torch.matmul(ds.transpose(-1, -2), qa)
    dk, dv = _group_sum(dk, hkv), _group_sum(dv, hkv)
    dbias = None if dbias is None else dbias.to(bias.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias


def _sum_to(t, shape):
    """Reduce a full-shape gradient over the dims that were broadcast (size 1 in `shape`)."""
    dims = [i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _group_sum(t, hkv):
    """(B, Hq, N, D) gradient of an expanded K/V -> (B, Hkv, N, D), summed over each group."""
    b, hq, n, d = t.shape
    if hq == hkv:
        return t
    return t.reshape(b, hkv, hq // hkv, n, d).sum(2)
