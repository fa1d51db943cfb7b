"""Rewrite a proven Plan into one call of torch.ops.flashfuse.fwd.

New nodes get FakeTensor metadata computed from their inputs' metadata, so later passes
(inductor's included) see a well-formed graph. The rewrite is transactional: nodes are built
first, and uses are switched over only when every one of them was built.
"""
import contextlib
import operator

import torch
from torch.fx import Node

from flashfuse.kernels import op as flash_op
from flashfuse.patterns import ops
from flashfuse.patterns.layout import known_equal
from flashfuse.patterns.ops import meta
from flashfuse.patterns.plan import Refuse, shape_of


class _Builder:
    """Appends nodes before `anchor`, each with its fake value in meta['example_value']."""

    def __init__(self, graph, anchor):
        self.graph, self.anchor, self.created = graph, anchor, []

    def __call__(self, fn, *args, method=False, **kwargs):
        val = _value(fn, args, kwargs, method)
        with self.graph.inserting_before(self.anchor):
            node = (self.graph.call_method(fn, args, kwargs) if method
                    else self.graph.call_function(fn, args, kwargs))
        node.meta["example_value"] = val
        self.created.append(node)
        return node

    def rollback(self):
        for node in reversed(self.created):
            self.graph.erase_node(node)


def _value(fn, args, kwargs, method):
    def unwrap(a):
        if isinstance(a, Node):
            return meta(a)
        if isinstance(a, (list, tuple)):
            return type(a)(unwrap(x) for x in a)
        return a
    args, kwargs = unwrap(args), {k: unwrap(v) for k, v in kwargs.items()}
    fake_mode = next((a.fake_mode for a in args if hasattr(a, "fake_mode")), None)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        if method:
            return getattr(args[0], fn)(*args[1:], **kwargs)
        return fn(*args, **kwargs)


def fake_value(fn, *args):
    """fn's result on the fake values of its node arguments: the metadata a new node gets."""
    return _value(fn, args, {}, False)


def _size(b, node, dim):
    n = meta(node).shape[dim]
    return n if isinstance(n, int) else b("size", node, dim, method=True)


def _to_4d(b, node):
    while meta(node).dim() < 4:
        node = b(torch.unsqueeze, node, 0)
    return node


def _broadcast_arg(b, node, full, what):
    """A bias or mask node as 4-D, checked to broadcast to `full` without being expanded."""
    rank = meta(node).dim()
    if rank > 4:
        raise Refuse(f"the {what} has rank {rank}")
    node = _to_4d(b, node)
    for n, f in zip(shape_of(node), full):
        if not (known_equal(n, 1) or known_equal(n, f)):
            raise Refuse(f"the {what} of shape {shape_of(node)} does not broadcast to the scores {tuple(full)}")
    return node


def apply(graph, plan):
    """Replace plan.output with the fused op; returns the new output node. Raises Refuse on failure."""
    b = _Builder(graph, plan.output)
    try:
        out = _build(b, plan)
    except Exception:
        b.rollback()
        raise
    for consumer, multiply, src in plan.bypass:
        consumer.replace_input_with(multiply, src)
    old = plan.output
    old.replace_all_uses_with(out)
    _erase_dead(graph, reversed(plan.chain + [old] + [m for _, m, _ in plan.bypass]))
    return out


def _erase_dead(graph, nodes):
    """Erase the nodes the rewrite left without users, and the pure views that fed only them."""
    pending = list(nodes)
    while pending:
        node = pending.pop(0)
        if node.users or node.op not in ("call_function", "call_method") or node._erased:
            continue
        inputs = [a for a in node.all_input_nodes]
        graph.erase_node(node)
        pending += [a for a in inputs if _is_view(a)]


def _is_view(node):
    return ops.target(node) in ops.REMOVABLE_VIEWS


def _same(a, b):
    return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))


def _regroup(b, plan, node, batch, what):
    """An operand laid out over `batch` (its product's batch dims), reshaped to the scores' batch dims."""
    canon = plan.scores_shape[:-2]
    if _same(batch, canon):
        return node
    if not _same(shape_of(node)[:-2], batch):
        raise Refuse(f"{what} broadcasts over batch dims that the scores regroup")
    sizes = [_size(b, plan.scores_node, i) for i in range(len(canon))]
    return b("reshape", node, *sizes, _size(b, node, -2), _size(b, node, -1), method=True)


def _regroup_term(b, plan, node, layout, what):
    """A bias or mask added to scores of shape `layout`, brought to the softmax's layout."""
    canon = plan.scores_shape[:-2]
    if _same(layout[:-2], canon):
        return node
    while meta(node).dim() < 2:
        node = b(torch.unsqueeze, node, 0)
    shape = shape_of(node)
    lead = (1,) * (len(layout) - len(shape)) + shape[:-2]
    tail = [_size(b, node, -2), _size(b, node, -1)]
    if all(known_equal(n, 1) for n in lead):
        return b("reshape", node, *([1] * len(canon)), *tail, method=True)
    if not all(isinstance(n, int) for n in layout[:-2]):
        raise Refuse(f"the {what} is added in a layout with symbolic batch dims that the scores regroup")
    full = b("expand", node, *layout[:-2], -1, -1, method=True)
    sizes = [_size(b, plan.scores_node, i) for i in range(len(canon))]
    return b("reshape", full, *sizes, *tail, method=True)


def _fold_leading(b, plan, node, what):
    """Rank-5 scores (B, windows, H, N, N): an operand's two leading batch dims as one, so the op sees 4-D."""
    if len(plan.scores_shape) != 5:
        return node
    if meta(node).dim() != 5:
        raise Refuse(f"{what} broadcasts over the leading batch dims of rank-5 scores")
    return b("flatten", node, 0, 1, method=True)


def _fold_term(b, plan, node):
    """A bias or mask term of rank-5 scores, its two leading dims as one (expanded first when they broadcast)."""
    if len(plan.scores_shape) != 5:
        return node
    while meta(node).dim() < 5:
        node = b(torch.unsqueeze, node, 0)
    lead = shape_of(node)[:2]
    if not all(known_equal(n, 1) for n in lead):
        sizes = [_size(b, plan.scores_node, i) for i in range(2)]
        node = b("expand", node, *sizes, -1, -1, -1, method=True)
    return b("flatten", node, 0, 1, method=True)


def _build(b, plan):  # noqa: C901  (one step per operand; kept in order)
    if len(plan.scores_shape) > 5:
        raise Refuse(f"scores of rank {len(plan.scores_shape)}")
    q, k, v = plan.q.node, plan.k.node, plan.v.node
    if plan.k.transpose:
        k = b(torch.transpose, k, -2, -1)
    qk_batch = shape_of(plan.product)[:-2] if plan.product is not None else plan.scores_shape[:-2]
    pv_batch = shape_of(plan.output)[:-2]
    q, k = _regroup(b, plan, q, qk_batch, "q"), _regroup(b, plan, k, qk_batch, "k")
    v = _regroup(b, plan, v, pv_batch, "v")
    for t, kind in plan.scale_tensors:
        q = b(torch.mul if kind == "mul" else torch.div, q, t)
    dtype = meta(q).dtype
    if meta(k).dtype != dtype:
        k = b("to", k, dtype, method=True)
    if meta(v).dtype != dtype:
        v = b("to", v, dtype, method=True)
    q, k, v = (_to_4d(b, _fold_leading(b, plan, t, what)) for t, what in ((q, "q"), (k, "k"), (v, "v")))
    (bq, hq), (bk, hk), (bv, hv) = shape_of(q)[:2], shape_of(k)[:2], shape_of(v)[:2]
    gk, gv = plan.k.group, plan.v.group
    if not (known_equal(bk, bv) and known_equal(hk * gk, hv * gv)):
        raise Refuse("k and v differ in batch or heads")
    if not known_equal(hk, hv):
        raise Refuse("repeat_kv was absorbed on only one of k and v")
    if not known_equal(bq, bk):
        if known_equal(bk, 1):
            k = b("expand", k, _size(b, q, 0), -1, -1, -1, method=True)
            v = b("expand", v, _size(b, q, 0), -1, -1, -1, method=True)
        elif known_equal(bq, 1):
            q = b("expand", q, _size(b, k, 0), -1, -1, -1, method=True)
        else:
            raise Refuse(f"batch sizes {bq} and {bk} do not broadcast")
    if not (known_equal(hq, hk * gk) or known_equal(hk, 1)):
        if known_equal(hq, 1):
            heads = hk * gk if isinstance(hk * gk, int) else b("mul", b("size", k, 1, method=True), gk)
            q = b("expand", q, -1, heads, -1, -1, method=True)
        else:
            raise Refuse(f"{hq} query heads and {hk * gk} key heads do not broadcast")
    full = (shape_of(q)[0], shape_of(q)[1], shape_of(q)[2], shape_of(k)[2])
    bias = _combined_bias(b, plan, full)
    mask = _combined_mask(b, plan, full)
    seed = plan.seed if plan.seed is not None else b(flash_op.new_seed, q) if plan.spec.random else None
    fused = b(torch.ops.flashfuse.fwd.default, q, k, v, bias, mask, seed, plan.spec.encode())
    out = b(operator.getitem, fused, 0)
    if plan.sink is not None:
        out = _sink_rescale(b, plan, fused, out, full)
    want = meta(plan.output)
    while meta(out).dim() > len(plan.scores_shape):
        out = b(torch.squeeze, out, 0)
    if not _same(shape_of(out)[:-2], pv_batch):
        sizes = [_size(b, plan.p, i) for i in range(len(pv_batch))]
        out = b("reshape", out, *sizes, _size(b, out, -2), _size(b, out, -1), method=True)
    if meta(out).dtype != want.dtype:
        out = b("to", out, want.dtype, method=True)
    return out


def _sink_rescale(b, plan, fused, out, full):
    """out * sigmoid(lse - sink): the sink's share of each row's softmax denominator (patterns/sinks.py)."""
    stats = b(operator.getitem, fused, 1)
    lse = b(torch.add, b(operator.getitem, stats, 0), b(operator.getitem, stats, 1))  # (B, Hq, Nq), fp32
    sink = _broadcast_arg(b, _fold_term(b, plan, plan.sink), full[:3] + (1,), "sink")
    if meta(sink).dtype != meta(lse).dtype:
        sink = b("to", sink, meta(lse).dtype, method=True)
    weight = b(torch.sigmoid, b(torch.sub, b(torch.unsqueeze, lse, -1), sink))
    return b("to", b(torch.mul, out, weight), meta(out).dtype, method=True)


def _combined_bias(b, plan, full):
    total = None
    for node, coeff, layout in plan.bias:
        node = _fold_term(b, plan, _regroup_term(b, plan, node, layout, "bias"))
        term = node if coeff == 1 else b(torch.mul, node, float(coeff))
        total = term if total is None else b(torch.add, total, term)
    return None if total is None else _broadcast_arg(b, total, full, "bias")


def _combined_mask(b, plan, full):
    keep = None
    for node, keeps, layout in plan.masks:
        node = _fold_term(b, plan, _regroup_term(b, plan, node, layout, "mask"))
        term = node if keeps else b(torch.logical_not, node)
        keep = term if keep is None else b(torch.logical_and, keep, term)
    return None if keep is None else _broadcast_arg(b, keep, full, "mask")
