"""The two products of an attention site: q.kT (matmul, bmm, baddbmm, einsum) and p.v."""
from torch.fx import Node

from flashfuse.patterns import layout
from flashfuse.patterns.ops import classify
from flashfuse.patterns.plan import Operand, Refuse, constant, shape_of, tensor_of


def score_product(node, plan):
    """Parse the q.kT product; set plan.q / plan.k and fold baddbmm's alpha/input."""
    op = classify(node)
    if op is None:
        return False
    if op.kind == "matmul":
        a, b = op.args["a"], op.args["b"]
    elif op.kind == "baddbmm":
        a, b = op.args["a"], op.args["b"]
        alpha, beta = constant(op.args["alpha"]), constant(op.args["beta"])
        if alpha is None or beta is None:
            raise Refuse("baddbmm with a non-constant alpha or beta")
        plan.update(scale=plan.spec.scale * alpha)
        if beta != 0:
            plan.bias.append((op.args["input"], beta, shape_of(node)))
    elif op.kind == "einsum":
        return _einsum_scores(node, op, plan)
    else:
        return False
    if not (isinstance(a, Node) and isinstance(b, Node) and tensor_of(a) is not None and tensor_of(b) is not None):
        return False
    if tensor_of(a).dim() < 2 or tensor_of(b).dim() < 2:
        return False
    rows = layout.swapped_last_two(b)
    plan.q = Operand(a)
    plan.k = Operand(rows) if rows is not None else Operand(b, transpose=True)
    return True


def _einsum_terms(op):
    eq = op.args["equation"].replace(" ", "")
    if "..." in eq or "->" not in eq or len(op.args["operands"]) != 2:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or not (len(terms[0]) == len(terms[1]) == len(out)) or len(out) < 2:
        return None
    if terms[0][:-2] != out[:-2] or terms[1][:-2] != out[:-2]:
        return None
    return terms[0], terms[1], out


def _einsum_scores(node, op, plan):
    parsed = _einsum_terms(op)
    if parsed is None:
        return False
    t1, t2, out = parsed
    i, j, c = out[-2], out[-1], t1[-1]
    if t1[-2] != i or c in out:
        return False
    a, b = op.args["operands"]
    if t2[-2:] == j + c:
        plan.q, plan.k = Operand(a), Operand(b)
    elif t2[-2:] == c + j:
        plan.q, plan.k = Operand(a), Operand(b, transpose=True)
    else:
        return False
    return True


def value_product(node, p):
    """If node is p.v (p as the left operand), return v's node in (..., Nk, Dv) layout."""
    op = classify(node)
    if op is None:
        return None
    if op.kind == "matmul" and op.args["a"] is p and op.args["b"] is not p:
        return op.args["b"]
    if op.kind == "einsum" and op.args["operands"][0] is p:
        parsed = _einsum_terms(op)
        if parsed is None:
            return None
        t1, t2, out = parsed
        if t1[-2] == out[-2] and t2[-2] == t1[-1] and t2[-1] == out[-1] and t1[-1] not in out:
            return op.args["operands"][1]
    return None
