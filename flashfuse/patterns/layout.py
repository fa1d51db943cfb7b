"""Where tensor dims come from: the proofs that a product contracts over the head dim, and GQA.

`is_feature_axis(node, dim)` follows a dim back through views, transposes, slices and elementwise ops to the
op that produced the data (a projection, an input): it holds when the dim is that tensor's last axis, its
features. A last axis that merges several back (rotary embeddings that view feature pairs as complex numbers)
holds when together they are one feature axis split up. q.kT must contract q's and k's feature axes; p.v must
not contract v's. A product of q with an untransposed k contracts k's token axis, and is refused, even when N
== D makes the shapes fit.
"""
import torch
from torch.fx import Node

from flashfuse.patterns import ops
from flashfuse.patterns.ops import meta

_MAX_DEPTH = 64


def _rank(node):
    t = meta(node)
    return t.dim() if isinstance(t, torch.Tensor) else None


def is_feature_axis(node, dim, depth=0):
    """True if `dim` of node's tensor is the last (feature) axis of the tensor its data came from."""
    rank = _rank(node)
    if rank is None:
        return False
    dim %= rank
    key = ops.target(node)
    if key is None or depth > _MAX_DEPTH:
        return dim == rank - 1
    src = node.args[0] if node.args else None
    trailing = _merged_trailing_dims(node, key, src) if dim == rank - 1 else None
    if trailing:  # the last axis is several of src's merged back, or a complex view of two
        return _is_feature_block(src, trailing, depth + 1)
    if key in ops.EINSUM:
        step = _einsum_source(node, dim)
    else:
        step = _source_dim(node, key, src, dim, rank)
    if step is _ROOT:
        return dim == rank - 1
    if step is None:
        return False
    src_node, src_dim = step
    return is_feature_axis(src_node, src_dim, depth + 1)


_ROOT = object()


def _full_operands(node):
    """The tensor operands of an elementwise node that have its own shape (not broadcast against it)."""
    return [a for a in node.args if isinstance(a, Node) and _rank(a) is not None
            and tuple(meta(a).shape) == tuple(meta(node).shape)]


def _merged_trailing_dims(node, key, src):
    """k >= 2 when node's last axis holds src's last k axes: a reshape that merges them (rotary embeddings'
    `view_as_real(...).flatten(-2)`), or view_as_complex (k = 2: the pair of reals); else None."""
    if not isinstance(src, Node) or _rank(src) is None:
        return None
    if key in ops.VIEW_AS_COMPLEX:
        return 2
    if key not in ops.RESHAPE or _rank(src) < 2:
        return None
    last, inp = meta(node).shape[-1], meta(src).shape
    size = 1
    for k in range(1, len(inp) + 1):
        size = size * inp[-k]
        if _known(size == last):
            return k if k >= 2 else None
        if not _known(size < last) and not _known(size <= last):
            return None
    return None


def _pair_source(node, depth):
    """x when node is an elementwise function of x[..., 0], x[..., 1], ... (the components of x's last axis) and
    of tensors broadcast against them: one entry of a rotation within x's last axis. None otherwise."""
    if not isinstance(node, Node) or depth > _MAX_DEPTH:
        return None
    key = ops.target(node)
    if key in ops.GETITEM and isinstance(node.args[1], tuple) and len(node.args[1]) == 2 \
            and node.args[1][0] is Ellipsis and isinstance(node.args[1][1], int) and isinstance(node.args[0], Node):
        return node.args[0]
    if key in ops.SAME_DIMS and node.args and isinstance(node.args[0], Node):
        return _pair_source(node.args[0], depth + 1)
    if key not in ops.ELEMENTWISE:
        return None
    sources = {_pair_source(a, depth + 1) for a in _full_operands(node)}
    return sources.pop() if len(sources) == 1 else None


def _is_feature_block(node, k, depth):
    """True if node's last k axes together are one feature axis split up: they come, through elementwise ops,
    complex views and reshapes that split or merge only them, from a tensor's last (feature) axis."""
    rank = _rank(node)
    if rank is None or depth > _MAX_DEPTH or k > rank:
        return False
    if k == 1:
        return is_feature_axis(node, rank - 1, depth)
    key = ops.target(node)
    if key in ops.STACK and k == 2:  # stack([f(x[..., 0], x[..., 1]), ...], -1): x's (n, 2) block, rotated
        along = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = node.args[0] if isinstance(node.args[0], (list, tuple)) else ()
        sources = {_pair_source(p, depth + 1) for p in parts}
        return (along % rank == rank - 1 and len(sources) == 1 and None not in sources
                and _is_feature_block(sources.pop(), 2, depth + 1))
    if key in ops.ELEMENTWISE:  # the operand of the output's own shape carries the block
        full = _full_operands(node)
        return bool(full) and _is_feature_block(full[0], k, depth + 1)
    src = node.args[0] if node.args else None
    if not isinstance(src, Node) or _rank(src) is None:
        return False
    if key in ops.SAME_DIMS and _rank(src) == rank:
        return _is_feature_block(src, k, depth + 1)
    if key in ops.VIEW_AS_REAL:  # the last k real axes are the complex tensor's last k - 1
        return _is_feature_block(src, k - 1, depth + 1)
    if key in ops.VIEW_AS_COMPLEX:
        return _is_feature_block(src, k + 1, depth + 1)
    if key in ops.RESHAPE:  # the block's elements must be exactly src's last j axes'
        out, inp = meta(node).shape, meta(src).shape
        block = 1
        for d in out[rank - k:]:
            block = block * d
        size = 1
        for j in range(1, len(inp) + 1):
            size = size * inp[-j]
            if _known(size == block):
                lead = rank - k  # the dims before the block: the same ones, unchanged
                return lead == len(inp) - j and all(_known(out[i] == inp[i]) for i in range(lead)) and \
                    _is_feature_block(src, j, depth + 1)
    return False


def _source_dim(node, key, src, dim, rank):  # noqa: C901  (one case per layout op)
    """(input node, input dim) that `dim` of node comes from; None if it comes from no single dim; _ROOT."""
    if not isinstance(src, Node) or _rank(src) is None:
        return _ROOT
    src_rank = _rank(src)
    if key in ops.SAME_DIMS and src_rank == rank:
        return src, dim
    if key in ops.TRANSPOSE:
        d0, d1 = node.args[1] % rank, node.args[2] % rank
        return src, {d0: d1, d1: d0}.get(dim, dim)
    if _is_mT(node):
        return src, {rank - 1: rank - 2, rank - 2: rank - 1}.get(dim, dim)
    if key in ops.PERMUTE:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return src, dims[dim] % rank
    if key in ops.MOVEDIM:
        return src, _moved_order(node.args[1], node.args[2], rank)[dim]
    if key in ops.REPEAT_INTERLEAVE:
        along = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        return None if along is None or along % rank == dim else (src, dim)
    if key in ops.UNSQUEEZE:
        d = node.args[1] % rank
        return None if dim == d else (src, dim - (dim > d))
    if key in ops.EXPAND:
        lead = rank - src_rank
        return None if dim < lead else (src, dim - lead)
    if key in ops.RESHAPE:
        repeated = unrepeat_kv(node)
        if repeated is not None and dim >= 2:  # repeat_kv keeps the token and feature dims
            return repeated[0], dim
        return _reshape_source(node, src, dim, rank, src_rank)
    if key in ops.GETITEM:
        return _getitem_source(node, src, dim, rank, src_rank)
    if key in ops.ELEMENTWISE:
        full = _full_operands(node)
        return (full[0], dim) if full else None
    if key in ops.SPLIT:
        return _ROOT  # a tuple; getitem on it is handled above
    if key in ops.CAT:
        first = node.args[0][0] if node.args and isinstance(node.args[0], (list, tuple)) else None
        return (first, dim) if isinstance(first, Node) and _rank(first) == rank else None
    return _ROOT


def _moved_order(source, destination, rank):
    """For x.movedim(source, destination): the input dim that each output dim comes from."""
    sources = [d % rank for d in (source if isinstance(source, (list, tuple)) else [source])]
    targets = [d % rank for d in (destination if isinstance(destination, (list, tuple)) else [destination])]
    order = [d for d in range(rank) if d not in sources]
    for target, source_dim in sorted(zip(targets, sources)):
        order.insert(target, source_dim)
    return order


def _einsum_source(node, dim):
    """A one-operand einsum that only permutes ("bhnd->bhdn"): the input dim of output dim `dim`."""
    operands = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) \
        else list(node.args[1])
    equation = node.args[0].replace(" ", "") if isinstance(node.args[0], str) else ""
    if len(operands) != 1 or "->" not in equation or "..." in equation or not isinstance(operands[0], Node):
        return None
    lhs, out = equation.split("->")
    if sorted(lhs) != sorted(out) or len(set(lhs)) != len(lhs):
        return None
    return operands[0], lhs.index(out[dim])


def _reshape_source(node, src, dim, rank, src_rank):
    out, inp = meta(node).shape, meta(src).shape
    if dim == rank - 1:
        last_in, last_out = inp[-1], out[-1]
        if _known(last_in == last_out) or _known(last_in % last_out == 0):
            return src, src_rank - 1
        return None
    # leading dims kept as they were (e.g. (B, N, H*D) -> (B, N, H, D) keeps B and N)
    if dim < src_rank - 1 and all(_known(out[i] == inp[i]) for i in range(dim + 1)):
        return src, dim
    return None


def _getitem_source(node, src, dim, rank, src_rank):
    index = node.args[1]
    if isinstance(meta(src), (list, tuple)):  # element of split/chunk/unbind output
        parent = src
        if ops.target(parent) in ops.UNBIND:
            along = (parent.args[1] if len(parent.args) > 1 else parent.kwargs.get("dim", 0))
            p_rank = _rank(parent.args[0])
            along %= p_rank
            return parent.args[0], dim + (dim >= along)
        return parent.args[0], dim
    if not isinstance(index, tuple):
        index = (index,)
    if any(i is Ellipsis for i in index):
        pos = index.index(Ellipsis)
        fill = src_rank - sum(1 for i in index if i is not None and i is not Ellipsis)
        index = index[:pos] + (slice(None),) * fill + index[pos + 1:]
    index = index + (slice(None),) * (src_rank - sum(1 for i in index if i is not None))
    out_dim, in_dim = 0, 0
    for i in index:
        if i is None:
            if out_dim == dim:
                return None
            out_dim += 1
        elif isinstance(i, slice):
            if out_dim == dim:
                return src, in_dim
            out_dim += 1
            in_dim += 1
        elif isinstance(i, int):
            in_dim += 1
        else:
            return None  # advanced indexing
    return None


def _known(expr):
    """True only when a (possibly symbolic) boolean is known to hold for every value of the symbols."""
    if isinstance(expr, bool):
        return expr
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return statically_known_true(expr)
    except Exception:
        return False


def known_equal(a, b):
    return _known(a == b)


def _is_mT(node):
    key = ops.target(node)
    if key is getattr:
        return node.args[1] == "mT"
    return key in ops.MATRIX_TRANSPOSE


def swapped_last_two(node):
    """If node is x with its last two dims swapped (transpose, mT, permute), return x."""
    key, rank = ops.target(node), _rank(node)
    if key is None or rank is None or rank < 2:
        return None
    if key in ops.TRANSPOSE:
        if {node.args[1] % rank, node.args[2] % rank} == {rank - 2, rank - 1}:
            return node.args[0]
    if _is_mT(node):
        return node.args[0]
    if key in ops.PERMUTE:
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if [d % rank for d in dims] == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return node.args[0]
    return None


def unrepeat_kv(node):
    """If node is repeat_kv(x, n) or repeat_interleave(x, n, dim=1) of a 4-D x, return (x, n); else None.

    repeat_kv is x[:, :, None].expand(B, Hkv, n, N, D).reshape(B, Hkv * n, N, D): head h reads
    x's head h // n, exactly the op's grouped-query indexing, so x can be passed unexpanded.
    """
    key = ops.target(node)
    if key in ops.REPEAT_INTERLEAVE:
        reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        along = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if isinstance(reps, int) and along is not None and along % 4 == 1 and _rank(node.args[0]) == 4:
            return node.args[0], reps
        return None
    if key not in ops.PLAIN_RESHAPE or _rank(node) != 4:
        return None
    expand = node.args[0]
    if not isinstance(expand, Node) or ops.target(expand) != "expand" or _rank(expand) != 5:
        return None
    unsq = expand.args[0]
    if not isinstance(unsq, Node):
        return None
    src = _unsqueezed_at_2(unsq)
    if src is None or _rank(src) != 4:
        return None
    e_shape, s_shape, o_shape = meta(expand).shape, meta(src).shape, meta(node).shape
    ok = (known_equal(e_shape[0], s_shape[0]) and known_equal(e_shape[1], s_shape[1])
          and known_equal(e_shape[3], s_shape[2]) and known_equal(e_shape[4], s_shape[3])
          and known_equal(o_shape[1], e_shape[1] * e_shape[2]) and known_equal(o_shape[2], s_shape[2]))
    return (src, e_shape[2]) if ok else None


def _unsqueezed_at_2(node):
    key = ops.target(node)
    if key in ops.UNSQUEEZE and node.args[1] % 5 == 2:
        return node.args[0]
    if key in ops.GETITEM and isinstance(node.args[1], tuple):
        idx = node.args[1]
        full = slice(None)
        if len(idx) >= 3 and idx[0] == full and idx[1] == full and idx[2] is None \
                and all(i == full or i is Ellipsis for i in idx[3:]):
            return node.args[0]
    return None
