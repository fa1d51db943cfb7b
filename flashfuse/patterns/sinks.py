"""Attention sinks: a learned logit per head (or per row) concatenated to the scores as one extra key column
before the softmax and sliced off after it (gpt-oss). The sink only enlarges the softmax's denominator:

    softmax([s, sink])[..., :Nk] @ v  =  (softmax(s) @ v) * sigmoid(lse(s) - sink)

so the op runs plain attention and the rewrite rescales its output by each row's logsumexp (the op's stats are
differentiable as their sum), which is exact forward and backward; a row that sees no key gives 0, as the sink
takes all its weight. A row-max subtraction before the softmax (`x - x.max(-1, keepdim=True).values`, for
stability) is a shift the softmax does not see, and is dropped.
"""
from torch.fx import Node

from flashfuse.patterns import ops
from flashfuse.patterns.plan import Refuse, single_user, tensor_of


def peel(x):
    """(scores, sink, nodes): the scores node under a sink column (and a row-max shift), the sink node and the
    nodes between them and the softmax; (x, None, []) when x has no sink."""
    original, nodes = x, []
    shifted = _row_shifted(x)
    if shifted is not None:
        nodes.append(x)
        x = shifted
    if ops.target(x) not in ops.CAT:
        return original, None, []
    parts = x.args[0] if x.args else None
    dim = x.args[1] if len(x.args) > 1 else x.kwargs.get("dim", 0)
    t = tensor_of(x)
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or t is None or dim not in (-1, t.dim() - 1):
        return original, None, []
    scores, sink = parts
    s, k = tensor_of(scores), tensor_of(sink)
    if s is None or k is None or k.shape[-1] != 1 or k.dim() != s.dim() or not k.is_floating_point():
        return original, None, []
    return scores, sink, nodes + [x]


def _row_shifted(x):
    """y when x is y - max(y, -1, keepdim=True) (the max's values); else None."""
    if ops.target(x) not in ops.MINUS or len(x.args) != 2 or not isinstance(x.args[1], Node):
        return None
    y, m = x.args
    if ops.target(m) in ops.GETITEM and m.args[1] == 0:  # torch.max(y, -1, keepdim=True)[0] / .values
        m = m.args[0]
        if ops.target(m) not in ops.ROW_MAX_WITH_INDEX:
            return None
    elif ops.target(m) not in ops.ROW_MAX:
        return None
    dim = m.args[1] if len(m.args) > 1 else m.kwargs.get("dim")
    keepdim = m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)
    t = tensor_of(y)
    if m.args[0] is not y or t is None or dim not in (-1, t.dim() - 1) or keepdim is not True:
        return None
    return y


def sliced_weights(softmax, n_keys):
    """The node that keeps the weights of the real keys, probs[..., :Nk] (the sink's column dropped)."""
    user = single_user(softmax, "the attention weights")
    index = user.args[1] if ops.target(user) in ops.GETITEM and len(user.args) == 2 else None
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        raise Refuse("the weights of an attention sink's softmax are not sliced back to the real keys")
    last = index[-1]
    lead_ok = all(i is Ellipsis or i == slice(None) for i in index[:-1])
    if not lead_ok or last.start not in (None, 0) or last.step not in (None, 1) or last.stop not in (-1, n_keys):
        raise Refuse("the weights of an attention sink's softmax are not sliced back to the real keys")
    return user
