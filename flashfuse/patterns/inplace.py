"""Turn in-place arithmetic (`s /= d`, `s += bias`, `s.masked_fill_(m, v)`) into out-of-place ops.

Done only where it is provably the same program: the mutated tensor is a fresh result of
arithmetic (not an input, not a view), and none of its uses can alias it. Later uses of the
mutated tensor then read the new node. Elsewhere the graph is left as it was, and the matcher's
single-use check refuses the site.
"""
from flashfuse.patterns import ops
from flashfuse.patterns.ops import classify

#: op kinds (ops.classify) whose result is a fresh tensor
_FRESH = {"matmul", "baddbmm", "einsum", "mul", "div", "add", "sub", "masked_fill", "where", "softmax", "tanh"}


def metadata_only_use(user, node):
    """True if `user` reads only node's shape or dtype (e.g. x.type_as(node), m.expand_as(node))."""
    if user.op == "call_method" and user.target in ops.METADATA_ONLY:
        return node not in user.args[:1] or user.target in ("size", "dim") or user.target.startswith("new_")
    if user.op == "call_method" and user.target == "to" and len(user.args) == 2 and user.args[1] is node:
        return True
    return False


def functionalize_inplace(graph):
    """Rewrite eligible in-place nodes; returns how many were rewritten."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for node in list(graph.nodes):
        op = classify(node)
        if op is None or not op.inplace or op.kind not in ("mul", "div", "add", "sub", "masked_fill"):
            continue
        target = node.args[0]
        if not _fresh(target, node, order):
            continue
        if node.op == "call_method":
            node.target = node.target[:-1]
        else:
            node.target = ops.OUT_OF_PLACE[node.target]
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
        count += 1
    return count


def _fresh(target, inplace_node, order):
    """Target is fresh arithmetic, and nothing read before the mutation can alias it."""
    producer = classify(target) if hasattr(target, "op") else None
    if producer is None or producer.kind not in _FRESH or producer.inplace:
        return False
    for user in target.users:
        if order[user] > order[inplace_node] or user is inplace_node or metadata_only_use(user, target):
            continue
        use = classify(user)
        if use is None or use.kind not in _FRESH:
            return False
    return True
