"""Masks built in the graph, taken apart into causal / sliding-window structure and key padding.

Hugging Face builds its masks inside the compiled graph: aranges over queries and keys, compared (`kv <= q`
causal, `kv > q - w` sliding window, `abs(q - kv) <= w` a two-sided one), and-ed with the padding as
`padding_mask[batch, kv]` (shape (B, 1, 1, Nk)), and turned into an additive tensor by `where(keep, 0,
finfo.min)`. `decompose` proves such a mask is the conjunction of structural terms, which the op takes as
`causal` / `window` and skips block by block, and key terms (size 1 on the query dim: they depend on batch, head
and key only), which the op takes as a small (B, 1, 1, Nk) mask instead of an N x N tensor. A comparison of
positions with a constant that holds at every position (`q >= 0`: transformers' bidirectional mask) is no
constraint. Any other term keeps the whole mask a tensor, with the reason.

Why that is exact: a query that sees a key gives its hidden keys weight exp(fill - max) = 0 in fp32
either way (fill <= -1e4). A query that sees no key (left padding hides every key of the first rows)
is a softmax over a row of equal fills in eager. With structure, whose hidden keys the op fills with -inf
rather than the fill, the op's empty_rows="average" gives that answer (match._take_structure, which keeps the
mask a tensor when a bias could hide some of the row's keys with -inf); without structure the op fills exactly
the keys eager fills, and its formula is the answer.
"""
import math
from dataclasses import dataclass

import torch
from torch.fx import Node

from flashfuse.patterns import ops
from flashfuse.patterns.chain import LARGE_NEGATIVE
from flashfuse.patterns.ops import classify, meta
from flashfuse.patterns.plan import constant, tensor_of

_FLIPPED = {"le": "ge", "lt": "gt", "ge": "le", "gt": "lt"}  # a < b is b > a


@dataclass(frozen=True)
class Decomposed:
    """A bool mask as structure and key terms: keep = visible(window) & all(key terms)."""
    window: tuple  # (left, right) keys around the aligned diagonal, -1 unbounded; (-1, 0) is causal
    keys: tuple  # ((node, keeps), ...): bool terms of shape (..., 1, Nk); keeps False: True hides the key

    @property
    def causal(self):
        return self.window[1] == 0


def _static_int(x):
    if isinstance(x, int):
        return x
    expr = getattr(getattr(x, "node", None), "expr", None)
    return int(expr) if expr is not None and expr.is_number else None


def additive_mask(bias, coeff):
    """(cond, keeps, fill) when `coeff * bias` is where(cond, 0, fill) or where(cond, fill, 0) with a fill that
    hides keys (fill * coeff <= -1e4); else None."""
    op = classify(ops.outer(bias))
    if op is None or op.kind != "where" or coeff <= 0:
        return None
    for zero, fill, keeps in (("a", "b", True), ("b", "a", False)):
        value = constant(op.args[fill])
        if _zero(op.args[zero]) is True and value is not None and value * coeff <= LARGE_NEGATIVE:
            return op.args["cond"], keeps, value * coeff
    return None


def decompose(cond, keeps, nq, nk):
    """Decomposed for a bool mask `cond` (True keeps the key when `keeps`, else hides it), or a reason (str)."""
    offset = _static_int(nk - nq)
    if offset is None or offset < 0:
        return "more queries than keys, or sizes not known at compile time"
    left = right = math.inf  # keys j in [i + offset - left, i + offset + right]
    keys = []
    for term, keep in _terms(cond, keeps):
        truth = _constant_truth(term, nq, nk)
        if truth is not None:
            if truth != keep:
                return f"mask term {term.name} hides every key"
            continue  # kept everywhere (bidirectional masks: q >= 0), or hides nothing
        bounds = _distance_bounds(term, keep)
        if bounds is None:
            bound = _bound(term) if keep or ops.target(term) != ops.ONES_METHOD else None
            bounds = None if bound is None else [bound if keep else _hidden_to_kept(bound)]
        if bounds is not None:
            for kind, value in bounds:
                if kind == "le":
                    right = min(right, value - offset)
                else:
                    left = min(left, offset - value)
        elif _keys_only(term):
            keys.append((term, keep))
        else:
            shape = tuple(tensor_of(term).shape) if tensor_of(term) is not None else "unknown"
            return (f"mask term {term.name} of shape {shape} varies with the query: neither causal/window "
                    "structure nor key padding")
    if right < 0 or left < 0:
        return "the structure hides a query's own (diagonal) key"
    return Decomposed(tuple(-1 if b == math.inf else int(b) for b in (left, right)), tuple(keys))


def _terms(node, keeps):
    """The terms of a conjunction of kept keys (a disjunction of hidden ones), each with its polarity."""
    node = ops.outer(node)
    key = ops.target(node)
    if (key in ops.AND and keeps) or (key in ops.OR and not keeps):
        return _terms(node.args[0], keeps) + _terms(node.args[1], keeps)
    if key in ops.NOT and isinstance(node.args[0], Node):
        return _terms(node.args[0], not keeps)
    if key in ops.MASK_PASS and isinstance(node.args[0], Node):
        return _terms(node.args[0], keeps)
    return [(node, keeps)]


def _constant_truth(term, nq, nk):
    """True / False when a comparison of query (or key) positions with a constant has that value at every
    position (transformers' bidirectional mask is `q >= 0`), or of one row's ids at a query and at a key when
    every row holds one id (`_same_row_ids`); None otherwise."""
    if ops.target(term) in ops.EQUAL:
        return _same_row_ids(term)
    kind = ops.COMPARE.get(ops.target(term))
    if kind is None or len(term.args) != 2:
        return None
    a, b = term.args
    index, other = _index(a), b
    if index is None:
        index, other = _index(b), a
        kind = _FLIPPED[kind]
    c = _static_int(other) if not isinstance(other, Node) else None
    n = _static_int(nq if index is not None and index[0] == "q" else nk)
    if index is None or c is None or n is None or n < 1:
        return None
    lo, hi = index[1], index[1] + n - 1  # the positions, arange(n) + start
    holds = {"le": (hi <= c, lo > c), "lt": (hi < c, lo >= c), "ge": (lo >= c, hi < c), "gt": (lo > c, hi <= c)}
    always, never = holds[kind]
    return True if always else False if never else None


def _same_row_ids(term):
    """ids[b, q] == ids[b, k] (True; != gives False) when ids is a (B, N) table computed from constants alone whose
    rows each hold one value: transformers' packed-sequence ids, `(diff(position_ids) != 1).cumsum(-1)`, when the
    position ids are its default arange (one sequence per row). The table is evaluated; None when it cannot be."""
    a, b = (_row_lookup(x) for x in term.args[:2]) if len(term.args) == 2 else (None, None)
    if a is None or b is None or a[:2] != b[:2] or {a[2], b[2]} != {"q", "k"}:  # one table, the same rows
        return None
    ids = _evaluate(a[0], {})
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not (ids == ids[:, :1]).all():
        return None
    return ops.EQUAL[ops.target(term)] == "eq"


def _row_lookup(node):
    """(table, rows, "q" | "k") for table[rows, positions]: a row's value at each query or key position."""
    if ops.target(node) not in ops.GETITEM or not isinstance(node.args[1], tuple) or len(node.args[1]) != 2:
        return None
    rows, positions = node.args[1]
    index = _index(positions)
    if not isinstance(node.args[0], Node) or not isinstance(rows, Node) or index is None:
        return None
    return node.args[0], rows, index[0]


#: the most elements `_evaluate` computes for one node: tables of ids, not (N, N) masks
_EVALUATE_LIMIT = 1 << 22
_UNKNOWN = object()


def _evaluate(node, memo):
    """The value of a node computed from constants alone (no graph input, parameter or random op), on the CPU, when
    every size is static and no intermediate exceeds _EVALUATE_LIMIT elements; else _UNKNOWN."""
    if not isinstance(node, Node):
        return node
    if node in memo:
        return memo[node]
    value = _UNKNOWN
    if node.op in ("call_function", "call_method") and ops.target(node) not in ops.RANDOM:
        t = tensor_of(node)
        static = t is None or all(isinstance(n, int) for n in t.shape)
        if static and (t is None or t.numel() <= _EVALUATE_LIMIT):
            args = torch.fx.node.map_arg(node.args, lambda n: _evaluate(n, memo))
            kwargs = {k: ("cpu" if k == "device" else v) for k, v in node.kwargs.items()}
            kwargs = torch.fx.node.map_arg(kwargs, lambda n: _evaluate(n, memo))
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            if not any(x is _UNKNOWN or isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)) for x in leaves):
                try:
                    fn = node.target if node.op == "call_function" else getattr(args[0], node.target)
                    value = fn(*args, **kwargs) if node.op == "call_function" else fn(*args[1:], **kwargs)
                except Exception:  # anything it cannot compute is simply not proven
                    value = _UNKNOWN
    memo[node] = value
    return value


def _hidden_to_kept(bound):
    """A term that hides key j <= i + c keeps j >= i + c + 1, and the other way round."""
    kind, value = bound
    return ("ge", value + 1) if kind == "le" else ("le", value - 1)


def _keys_only(term):
    """A bool tensor with size 1 on the query dim: it depends on batch, head and key only."""
    t = tensor_of(term) if isinstance(term, Node) else None
    if t is None or t.dim() == 0 or t.dtype is not torch.bool:
        return False
    return t.dim() == 1 or _static_int(t.shape[-2]) == 1


def _zero(x):
    if isinstance(x, Node) and x.op == "call_function" and x.target in ops.ZEROS:
        return list(x.args[0]) == [] if x.target is not ops.ZEROS_LIKE and x.args else None
    return constant(x) == 0


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
        kind = _FLIPPED[kind]
    # j + a1 (kind) i + b1
    shift = b[1] - a[1]
    return {"le": ("le", shift), "lt": ("le", shift - 1), "ge": ("ge", shift), "gt": ("ge", shift + 1)}[kind]


def _distance_bounds(term, keep):
    """The two bounds [("ge", m - w), ("le", m + w)] of the keys kept by a distance term, |k - q - m| <= w (a
    bidirectional sliding window: ModernBERT's local layers build `abs(q - kv) <= w`), given as that term kept, or
    as its complement hidden; None for any other term (a distance kept beyond w is no band)."""
    kind = ops.COMPARE.get(ops.target(term))
    if kind is None or len(term.args) != 2:
        return None
    a, b = term.args
    if ops.target(a) not in ops.ABS:  # w >= |d| is |d| <= w
        a, b, kind = b, a, _FLIPPED[kind]
    if ops.target(a) not in ops.ABS or isinstance(b, Node) or _static_int(b) is None:
        return None
    m, w = _difference(a.args[0]), _static_int(b)
    within = {("le", True): w, ("lt", True): w - 1, ("gt", False): w, ("ge", False): w - 1}.get((kind, keep))
    if m is None or within is None:
        return None
    return [("ge", m - within), ("le", m + within)]


def _difference(node):
    """m with |node| = |k - q - m| when node is a difference of query and key positions (each plus a constant),
    either way round; else None."""
    if ops.target(node) not in ops.MINUS or len(node.args) != 2:
        return None
    a, b = _index(node.args[0]), _index(node.args[1])
    if a is None or b is None or a[0] == b[0]:
        return None
    if a[0] == "q":  # (q + ca) - (k + cb) = -(k - q - (ca - cb))
        return a[1] - b[1]
    return b[1] - a[1]  # (k + ca) - (q + cb) = k - q - (cb - ca)


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
        if len(index) == 2 and all(isinstance(i, Node) for i in index):  # positions[batch, idx], every row arange
            start, inner = _position_rows(node.args[0]), _index(index[1])
            return None if start is None or inner is None else (inner[0], inner[1] + start)
        slices = [i for i, s in enumerate(index) if isinstance(s, slice)]
        if len(slices) != 1 or any(s is not None for i, s in enumerate(index) if i != slices[0]):
            return None
        start = _arange_start(node.args[0])
        if start is None:
            return None
        axis = {len(index) - 1: "k", len(index) - 2: "q"}.get(slices[0])
        return None if axis is None else (axis, start)
    return None


def _position_rows(node):
    """c if node is (B, N) positions whose every row is arange(N) + c: transformers' default position_ids,
    `(arange(N) + c).unsqueeze(0)` then `.expand(B, -1)` or `.repeat(B, 1)`. Positions a user passes are data, and
    give None."""
    while ops.target(node) in ops.MASK_PASS or (ops.target(node) in ops.REPEAT and _repeats_rows(node)):
        node = node.args[0]
    if ops.target(node) not in ops.UNSQUEEZE or len(node.args) != 2 or node.args[1] != 0:
        return None
    return _arange_start(node.args[0])


def _repeats_rows(node):
    """True for x.repeat(b, 1): whole rows repeated, each row as it was."""
    counts = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
    return len(counts) == 2 and _static_int(counts[1]) == 1


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
