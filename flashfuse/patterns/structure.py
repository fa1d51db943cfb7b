"""Masks built in the graph from index comparisons, recognized as causal and sliding-window structure.

Hugging Face builds its masks inside the compiled graph: aranges over queries and keys, compared
(`kv <= q` causal, `kv > q - w` sliding window), combined with `&`, and turned into an additive
tensor by `where(keep, 0, finfo.min)`. When every term of such a mask is structural, the op can
take it as `causal` / `window` and skip the hidden blocks instead of reading an N x N bias.

That is exact: each query keeps its diagonal key, so no row is ever fully hidden, and a hidden
key's exp(fill - max) is 0 in fp32 either way. A mask with any other term (a padding mask, which
can hide a whole row) stays a bias.
"""
from torch.fx import Node

from flashfuse.patterns import ops
from flashfuse.patterns.chain import LARGE_NEGATIVE
from flashfuse.patterns.ops import classify, meta
from flashfuse.patterns.plan import constant


def _static_int(x):
    if isinstance(x, int):
        return x
    expr = getattr(getattr(x, "node", None), "expr", None)
    return int(expr) if expr is not None and expr.is_number else None


def structure_of(bias, coeff, nq, nk):
    """(left, right) window bounds (-1 unbounded) if `coeff * bias` is a purely structural mask."""
    op = classify(bias)
    if op is None or op.kind != "where" or coeff <= 0:
        return None
    if _zero(op.args["a"]) is not True:
        return None
    fill = constant(op.args["b"])
    if fill is None or fill * coeff > LARGE_NEGATIVE:
        return None
    offset = _static_int(nk - nq)
    if offset is None or offset < 0:
        return None
    left = right = float("inf")  # keys j in [i + offset - left, i + offset + right]
    for term in _conjunction(op.args["cond"]):
        bound = _bound(term)
        if bound is None:
            return None
        kind, value = bound  # "le": key j <= i + value; "ge": key j >= i + value
        if kind == "le":
            right = min(right, value - offset)
        else:
            left = min(left, offset - value)
    if right < 0 or left < 0:
        return None  # every query must keep its diagonal key
    return tuple(-1 if bound == float("inf") else int(bound) for bound in (left, right))


def _zero(x):
    if isinstance(x, Node) and x.op == "call_function" and x.target in ops.ZEROS:
        return list(x.args[0]) == [] if x.target is not ops.ZEROS_LIKE and x.args else None
    return constant(x) == 0


def _conjunction(node):
    key = ops.target(node)
    if key in ops.AND:
        return _conjunction(node.args[0]) + _conjunction(node.args[1])
    if key in ops.MASK_PASS and isinstance(node.args[0], Node):
        return _conjunction(node.args[0])
    return [node]


def _bound(term):
    """("le", c) for key <= query + c, ("ge", c) for key >= query + c; a literal True as ("le", inf)."""
    if ops.target(term) == ops.ONES_METHOD and meta(term).dim() == 0:
        return "le", float("inf")
    kind = ops.COMPARE.get(ops.target(term))
    if kind is None or len(term.args) != 2:
        return None
    a, b = _index(term.args[0]), _index(term.args[1])
    if a is None or b is None or a[0] == b[0]:
        return None
    if a[0] == "q":  # put the key side first: q <= k is k >= q
        a, b = b, a
        kind = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}[kind]
    # j + a1 (kind) i + b1
    shift = b[1] - a[1]
    return {"le": ("le", shift), "lt": ("le", shift - 1), "ge": ("ge", shift), "gt": ("ge", shift + 1)}[kind]


def _index(node):
    """("q" | "k", c) if node holds query / key positions plus a constant c, laid along dim -2 / -1."""
    if not isinstance(node, Node):
        return None
    key = ops.target(node)
    if key in ops.MASK_PASS:
        return _index(node.args[0])
    if key in ops.PLUS or key in ops.MINUS:
        x, c = node.args
        c = _static_int(c) if not isinstance(c, Node) else None
        inner = _index(x)
        if inner is None or c is None:
            return None
        return inner[0], inner[1] + (c if key in ops.PLUS else -c)
    if key in ops.GETITEM and isinstance(node.args[1], tuple):
        index = node.args[1]
        slices = [i for i, s in enumerate(index) if isinstance(s, slice)]
        if len(slices) != 1 or any(s is not None for i, s in enumerate(index) if i != slices[0]):
            return None
        start = _arange_start(node.args[0])
        if start is None:
            return None
        axis = {len(index) - 1: "k", len(index) - 2: "q"}.get(slices[0])
        return None if axis is None else (axis, start)
    return None


def _arange_start(node):
    """c if node is arange(n) + c (1-D positions 0..n-1 shifted by c)."""
    key = ops.target(node)
    if key in ops.ARANGE:
        if len(node.args) == 1 and not {"start", "step"} & set(node.kwargs):
            return 0
        return None
    if (key in ops.PLUS or key in ops.MINUS) and isinstance(node.args[0], Node):
        c = node.args[1]
        inner = _arange_start(node.args[0])
        c = _static_int(c) if not isinstance(c, Node) else None
        if inner is None or c is None:
            return None
        return inner + (c if key in ops.PLUS else -c)
    return None
