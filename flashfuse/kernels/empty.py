"""Problems with nothing to compute: no batch, no heads, no queries or no keys. Both implementations answer
them here, before any launch, as eager attention does: with no keys, softmax(q @ k^T) @ v sums nothing and
gives 0 (not NaN), and every gradient is 0.
"""
import torch


def is_empty(q, k):
    b, hq, nq, _ = q.shape
    return b == 0 or hq == 0 or nq == 0 or k.shape[2] == 0


def forward(q, k, v, stats_dtype):
    """out (B, Hq, Nq, Dv) of zeros, stats (2, B, Hq, Nq): max and log-sum of no scores, -inf."""
    b, hq, nq, _ = q.shape
    out = q.new_zeros((b, hq, nq, v.shape[-1]))
    return out, torch.full((2, b, hq, nq), float("-inf"), dtype=stats_dtype, device=q.device)


def backward(q, k, v, bias, bias_grad):
    """Zero gradients of q, k, v (and of the bias when asked)."""
    dbias = torch.zeros(bias.shape, dtype=bias.dtype, device=bias.device) if bias_grad else None
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
