"""empty_rows="average": a query that sees no key averages v over all Nk keys.

That is what eager attention computes when one finite fill (finfo.min, -1e9) hides a whole row: the softmax of a
row of equal scores is uniform. A padded query under a causal mask is such a row. The op hides structure
(causal, window) with -inf and skips those blocks, so the kernels alone would average only the keys of the
row's band; these fix-ups give every such row eager's answer: this module on the CPU path (and as the rule's
statement), flash_hidden.py's two kernels on the Triton path.

A hidden row is one whose row max is the mask's fill (every key it saw was filled) or -inf (it saw none). The
forward marks its max -inf, so the backward kernels treat it as empty, and `finish_backward` adds its gradient:
dv gets dout / Nk at every key. With spec.fill_adds (eager computed s + fill, which rounds to fill) autograd
also sends the uniform softmax's score gradient dS_ij = (dout_i . v_j - delta_i) / Nk into the swallowed scores,
and so into q and k; with s = scale * q . k that is a product of small matrices, never an (Nq, Nk) tensor:

    dq_i += scale / Nk * (dout_i @ V^T K - delta_i * sum_j k_j)          delta_i = dout_i . mean(v)
    dk_j += scale / Nk * (v_j @ sum_i dout_i^T q_i - sum_i delta_i q_i)  (sums over hidden rows only)
"""
import torch

from flashfuse.kernels.reference import repeat_kv


def finish_forward(out, stats, v, spec):
    """(out, stats) with hidden rows averaged over v and their max set to -inf. out (B, Hq, Nq, Dv)."""
    if spec.empty_rows != "average":
        return out, stats
    row_max = stats[0]
    hidden = (row_max == spec.mask_value) | torch.isneginf(row_max)  # (B, Hq, Nq)
    mean = repeat_kv(v.mean(-2, keepdim=True, dtype=stats.dtype), out.shape[1] // v.shape[1])  # (B, Hq, 1, Dv)
    out = torch.where(hidden[..., None], mean.to(out.dtype), out)
    stats = torch.stack([row_max.masked_fill(hidden, float("-inf")), stats[1].masked_fill(hidden, 0.0)])
    return out, stats


def finish_backward(grads, dout, q, k, v, stats, spec):
    """(dq, dk, dv) plus the hidden rows' share (see the module docstring). The products run in the inputs' dtype
    (fp32 accumulation): they are zero off the hidden rows, so every other row's gradient is left exactly as is."""
    dq, dk, dv = grads
    if spec.empty_rows != "average" or dout.numel() == 0 or v.numel() == 0:
        return dq, dk, dv
    nk, hkv = v.shape[2], v.shape[1]
    hidden = torch.isneginf(stats[0])[..., None]  # (B, Hq, Nq, 1), as finish_forward left it
    do = _grouped(dout.masked_fill(~hidden, 0.0), hkv)  # (B, Hkv, G * Nq, Dv): zero off hidden rows
    dv = dv + (do.sum(-2, keepdim=True, dtype=stats.dtype) / nk).to(dv.dtype)
    if not spec.fill_adds:
        return dq, dk, dv
    kx, vx = k.to(do.dtype), v.to(do.dtype)
    delta = do @ vx.mean(-2, dtype=stats.dtype).to(do.dtype).unsqueeze(-1)  # (B, Hkv, G * Nq, 1)
    c = spec.scale / nk
    dq_extra = c * (do @ (vx.mT @ kx) - delta * kx.sum(-2, keepdim=True))
    qg = _grouped(q.to(do.dtype), hkv)
    dk_extra = c * (vx @ (do.mT @ qg) - (delta * qg).sum(-2, keepdim=True))
    return dq + dq_extra.reshape(dq.shape).to(dq.dtype), dk + dk_extra.to(dk.dtype), dv


def _grouped(t, hkv):
    """(B, Hq, N, D) -> (B, Hkv, G * N, D): the query heads that share a KV head, stacked."""
    b, hq, n, d = t.shape
    return t.reshape(b, hkv, (hq // hkv) * n, d)
