"""The matcher: anchor at each softmax, prove the attention around it, describe it as one spec.

For a softmax node it walks back through the score chain to the q.kT product and forward to the
p.v product, folding every op on the way into a `Plan`: scale, softcap, bias terms, mask, dropout,
the q/k/v nodes in (..., N, D) layout and how to make them 4-D. Any step it cannot prove raises
`Refuse` with a reason in plain words, and the site stays as it was.
"""
import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Node

from flashfuse.patterns import layout
from flashfuse.patterns.inplace import metadata_only_use
from flashfuse.patterns.ops import classify, meta

LARGE_NEGATIVE = -1e4  # a fill at or below this hides a key: exp(fill - max) underflows to 0 in fp32
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Refuse(Exception):
    """The site is not provably attention; the message says why."""


@dataclass
class Operand:
    """A q, k or v tensor in (..., N, D) layout: `node`, transposed first when `transpose` is set."""
    node: Node
    transpose: bool = False
    group: int = 1  # repeat_kv factor absorbed (the op reads node's heads directly)


@dataclass
class Plan:
    softmax: Node
    product: Node  # the q.kT node
    output: Node  # the p.v node the op replaces
    q: Operand = None
    k: Operand = None
    v: Operand = None
    scale: float = 1.0
    scale_tensors: list = field(default_factory=list)  # [(node, "mul" | "div")], 0-dim, applied to q
    softcap: float = 0.0
    bias: list = field(default_factory=list)  # [(node, coefficient, shape of the scores it was added to)]
    hide: list = field(default_factory=list)  # [(bool node, True if it keeps keys, shape of the scores)]
    scores_shape: tuple = ()  # the layout the softmax sees; q, k, v, bias and mask are brought to it
    scores_node: Node = None  # a node of that shape, for its sizes
    p: Node = None  # the weights as p.v reads them
    mask_value: float = float("-inf")
    dropout_p: float = 0.0
    causal: bool = False
    zero_empty_rows: bool = False  # SDPA's convention: a query that sees no key gives 0
    bypass: list = field(default_factory=list)  # scalar mul/div nodes on q/k folded into `scale`
    chain: list = field(default_factory=list)  # nodes made dead by the rewrite

    def spec(self):
        return {"scale": self.scale if not self.scale_tensors else "runtime", "causal": self.causal,
                "window": None, "softcap": self.softcap or None, "bias": bool(self.bias), "mask": bool(self.hide),
                "gqa": max(self.k.group, 1) if self.k else 1, "dropout_p": self.dropout_p}


def _shape(node):
    return tuple(meta(node).shape)


def _keeps_last_two(view):
    """A view of the scores that only regroups batch dims: (B*H, Nq, Nk) <-> (B, H, Nq, Nk)."""
    src, out = meta(view.args[0]), meta(view)
    if not isinstance(src, torch.Tensor) or src.dim() < 2 or out.dim() < 2 or out.dim() > 5:
        return False
    return layout.known_equal(src.shape[-1], out.shape[-1]) and layout.known_equal(src.shape[-2], out.shape[-2])


def _tensor(x):
    t = meta(x)
    return t if isinstance(t, torch.Tensor) else None


def real_users(node):
    return [u for u in node.users if not metadata_only_use(u, node)]


def _single_user(node, what):
    users = real_users(node)
    if len(users) != 1:
        names = ", ".join(u.name for u in users) or "nothing"
        raise Refuse(f"{what} ({node.name}) has other users ({names}); returned or reused attention weights")
    return users[0]


def constant(x):
    """The Python value of a scalar: a number, or a 0-dim constant built in the graph; else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, Node):
        return None
    op = x.target if x.op == "call_function" else None
    if op in (torch.full,) and len(x.args) >= 2 and list(x.args[0]) == [] and isinstance(x.args[1], (int, float)):
        return float(x.args[1])
    if op in (torch.tensor, torch.as_tensor) and x.args and isinstance(x.args[0], (int, float)):
        return float(x.args[0])
    if op in (math.sqrt, operator.truediv, operator.mul, operator.pow) and all(
            isinstance(a, (int, float)) for a in x.args):
        return float(op(*x.args))
    if x.op == "call_method" and x.target in ("to", "type") and isinstance(x.args[0], Node):
        return constant(x.args[0])
    return None


def _runtime_scalar(x):
    """A 0-dim float tensor, or a number Dynamo made a graph input (a SymFloat after recompiles)."""
    t = meta(x)
    if isinstance(t, torch.Tensor):
        return t.dim() == 0 and t.is_floating_point()
    return isinstance(t, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(t, bool)


# ---------------------------------------------------------------- the two products

def _score_product(node, plan):
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
        plan.scale *= alpha
        if beta != 0:
            plan.bias.append((op.args["input"], beta, _shape(node)))
    elif op.kind == "einsum":
        return _einsum_scores(node, op, plan)
    else:
        return False
    if not (isinstance(a, Node) and isinstance(b, Node) and _tensor(a) is not None and _tensor(b) is not None):
        return False
    if _tensor(a).dim() < 2 or _tensor(b).dim() < 2:
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


def _value_product(node, p):
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


# ---------------------------------------------------------------- the score chain

def _chain_back(x, depth=0):
    """Ops from the product to the softmax input, product first; None if no product is reached."""
    if not isinstance(x, Node) or depth > 32:
        return None
    probe = Plan(None, None, None)
    try:
        if _score_product(x, probe):
            return [x]
    except Refuse:
        return None
    op = classify(x)
    if op is None:
        return None
    candidates = {
        "mul": ("x", "y"), "div": ("x",), "add": ("x", "y"), "sub": ("x",), "masked_fill": ("x",),
        "where": ("a", "b"), "cast": ("x",), "tanh": ("x",), "view": ("x",),
    }.get(op.kind, ())
    if op.kind == "view" and not _keeps_last_two(x):
        return None
    for name in candidates:
        path = _chain_back(op.args.get(name), depth + 1)
        if path is not None:
            return path + [x]
    return None


def _fold(node, prev, plan, state):  # noqa: C901  (one branch per kind of op on the chain)
    """Fold one chain op (whose chain input is `prev`) into the plan."""
    op = classify(node)
    kind, args = op.kind, op.args
    if state.get("tanh") and kind != "mul":
        raise Refuse("tanh on the scores is not followed by a multiply (not a softcap)")
    if kind in ("cast", "view"):
        return  # views keep the last two dims (checked when the chain is found)
    if kind in ("mul", "div"):
        other = args["y"] if args["x"] is prev else args["x"]
        if kind == "div" and args["x"] is not prev:
            raise Refuse("the scores are a divisor")
        c = constant(other)
        if state.get("tanh"):
            if c is None or c <= 0:
                raise Refuse("tanh on the scores is not followed by a positive constant multiply")
            plan.softcap = c
            plan.scale *= c
            state["tanh"] = False
            state["capped"] = True
            return
        if c is None:
            if not _runtime_scalar(other):
                raise Refuse(f"scores multiplied by a tensor of shape {tuple(_tensor(other).shape)}"
                             if _tensor(other) is not None else "scores multiplied by an unknown value")
            if plan.bias or plan.hide or plan.softcap:
                raise Refuse("a tensor scale applied after a bias, mask or softcap")
            plan.scale_tensors.append((other, kind))
            return
        c = 1.0 / c if kind == "div" else c
        if not math.isfinite(c) or c == 0:
            raise Refuse(f"scale {c} is not a finite nonzero number")
        if state.get("capped"):
            raise Refuse("a scale applied after the softcap")
        if plan.hide and c < 0:
            raise Refuse("a negative scale after a mask")
        plan.scale *= c
        plan.bias = [(b, w * c, shape) for b, w, shape in plan.bias]
        if math.isfinite(plan.mask_value):
            plan.mask_value *= c
        return
    if kind == "tanh":
        if plan.bias or plan.hide or state.get("capped"):
            raise Refuse("tanh after a bias or mask (a softcap comes first)")
        state["tanh"] = True
        return
    if kind in ("add", "sub"):
        if args["x"] is not prev and kind == "sub":
            raise Refuse("the scores are subtracted from a tensor")
        other = args["y"] if args["x"] is prev else args["x"]
        alpha = constant(args.get("alpha", 1))
        if alpha is None:
            raise Refuse("add with a non-constant alpha")
        sign = -alpha if kind == "sub" else alpha
        if constant(other) is not None and not isinstance(other, Node):
            return  # a constant shift; softmax does not see it
        t = _tensor(other)
        if t is None or not t.is_floating_point():
            raise Refuse("scores added to a non-float value")
        if plan.hide and math.isfinite(plan.mask_value):
            raise Refuse("a bias added after a finite mask fill")
        plan.bias.append((other, sign, _shape(prev)))
        return
    if kind in ("masked_fill", "where"):
        if kind == "masked_fill":
            hide, fill, negate = args["mask"], args["value"], False
        elif args["a"] is prev:
            hide, fill, negate = args["cond"], args["b"], True
        else:
            hide, fill, negate = args["cond"], args["a"], False
        value = constant(fill)
        if value is None or not (value <= LARGE_NEGATIVE):
            raise Refuse(f"masked_fill/where with value {fill} is not a mask (needs -inf or a large negative)")
        t = _tensor(hide)
        if t is None or t.dtype != torch.bool:
            raise Refuse("a mask that is not a bool tensor")
        if plan.hide and value != plan.mask_value:
            raise Refuse("two masks with different fill values")
        plan.hide.append((hide, negate, _shape(prev)))
        plan.mask_value = value
        return
    raise Refuse(f"unsupported op {node.name} between the product and the softmax")


# ---------------------------------------------------------------- the whole site

def match_softmax(softmax):
    """Prove the attention around `softmax`; return a Plan or raise Refuse."""
    op = classify(softmax)
    x = op.args["x"]
    t = _tensor(x)
    if t is None:
        raise Refuse("no shape information for the scores")
    dim = op.args["dim"]
    if not isinstance(dim, int) or dim % t.dim() != t.dim() - 1:
        raise Refuse(f"softmax over dim {dim}, not the last (key) dim")
    if t.dim() > 4 or t.dim() < 2:
        raise Refuse(f"scores of rank {t.dim()}: only (N, N), (B*H, N, N) and (B, H, N, N) are handled")
    path = _chain_back(x)
    if path is None:
        raise Refuse("no q.kT product found before the softmax")
    plan = Plan(softmax, path[0], None, scores_shape=tuple(t.shape), scores_node=x)
    _score_product(path[0], plan)
    state = {}
    for prev, node in zip(path, path[1:]):
        _single_user(prev, "the scores")
        _fold(node, prev, plan, state)
    if state.get("tanh"):
        raise Refuse("tanh on the scores is not followed by a multiply (not a softcap)")
    _single_user(path[-1], "the scores")
    plan.chain = list(path)
    plan.output = _after_softmax(softmax, plan)
    _check_operands(plan)
    return plan


def _after_softmax(softmax, plan):
    p = softmax
    plan.chain.append(softmax)
    while True:
        user = _single_user(p, "the attention weights")
        op = classify(user)
        if op is not None and (op.kind == "cast" or (op.kind == "view" and _keeps_last_two(user))) \
                and op.args["x"] is p:
            p = user
        elif op is not None and op.kind == "dropout" and op.args["x"] is p:
            rate, training = constant(op.args["p"]), op.args["training"]
            if rate is None or not isinstance(training, bool):
                raise Refuse("dropout with a non-constant rate or training flag")
            if training and rate > 0:
                plan.dropout_p = rate
            p = user
        else:
            v = _value_product(user, p)
            if user.op == "output":
                raise Refuse("the attention weights are returned")
            if v is None:
                raise Refuse(f"the attention weights feed {user.name}, not a p.v product")
            plan.v, plan.p = Operand(v), p
            return user
        plan.chain.append(p)


def _check_operands(plan):
    q, k, v = plan.q, plan.k, plan.v
    for name, operand in (("q", q), ("k", k), ("v", v)):
        t = _tensor(operand.node)
        if t is None or t.dtype not in _FLOAT_DTYPES:
            raise Refuse(f"{name} is not a float tensor")
    if not layout.is_feature_axis(q.node, -1):
        raise Refuse("the product does not contract q's feature (head) dim")
    k_dim = -2 if k.transpose else -1
    if not layout.is_feature_axis(k.node, k_dim):
        raise Refuse("the product does not contract k's feature (head) dim: k is not transposed")
    if not layout.is_feature_axis(v.node, -1) or layout.is_feature_axis(v.node, -2):
        raise Refuse("p.v does not contract v's token dim")
    _fold_operand_scales(plan)
    for operand in (k, v):
        if not operand.transpose and _tensor(operand.node).dim() == 4:
            found = layout.unrepeat_kv(operand.node)
            if found is not None:
                operand.node, operand.group = found


def _fold_operand_scales(plan):
    """Fold constant scalar multiplies on q and k (timm, Whisper, BART, d^-0.25 on both) into plan.scale.

    The multiply may sit under views and transposes; each node on the way must have one user.
    plan.bypass records (consumer, multiply, its input) for the rewrite to skip the multiply.
    """
    for operand in (plan.q, plan.k):
        child, node = None, operand.node
        for _ in range(16):
            if len(real_users(node)) != 1:
                break
            src, factor = _scaled(node)
            if src is not None:
                plan.scale *= factor
                if child is None:
                    operand.node = src
                else:
                    plan.bypass.append((child, node, src))
                node = src
                continue
            if node.op == "call_method" and node.target in _VIEWS and isinstance(node.args[0], Node):
                child, node = node, node.args[0]
                continue
            break


_VIEWS = ("view", "reshape", "transpose", "permute", "contiguous")


def _scaled(node):
    """(x, c) if node is x * c or x / c with a constant scalar c; else (None, None)."""
    op = classify(node)
    if op is None or op.kind not in ("mul", "div") or op.inplace:
        return None, None
    x, y = op.args["x"], op.args["y"]
    if op.kind == "mul" and not isinstance(x, Node):
        x, y = y, x
    c = constant(y)
    if not isinstance(x, Node) or _tensor(x) is None or c is None or c == 0 or not math.isfinite(c):
        return None, None
    if _tensor(node) is None or _tensor(x).dtype != _tensor(node).dtype:
        return None, None
    return x, (1.0 / c if op.kind == "div" else c)


def is_softmax(node):
    op = classify(node)
    return op is not None and op.kind == "softmax"


def sdpa_plan(node) -> Optional[Plan]:
    """Route an existing F.scaled_dot_product_attention call to the op."""
    args = classify(node).args
    q, k, v = args["q"], args["k"], args["v"]
    plan = Plan(None, None, node, Operand(q), Operand(k), Operand(v))
    ranks = {(_tensor(x).dim() if _tensor(x) is not None else -1) for x in (q, k, v)}
    if ranks not in ({4}, {3}):
        raise Refuse(f"SDPA operands of rank {sorted(ranks)}")
    plan.scores_shape = _shape(q)[:-1] + (_shape(k)[-2],)
    plan.scores_node = plan.p = q
    scale = constant(args["scale"]) if args["scale"] is not None else _tensor(q).shape[-1] ** -0.5
    if scale is None:
        raise Refuse("SDPA with a non-constant scale")
    plan.scale = float(scale)
    mask = args["attn_mask"]
    if mask is not None:
        t = _tensor(mask)
        if t is None:
            raise Refuse("SDPA attn_mask without shape information")
        if t.dtype == torch.bool:
            plan.hide.append((mask, True, plan.scores_shape))
        else:
            plan.bias.append((mask, 1.0, plan.scores_shape))
    dropout_p = constant(args["dropout_p"])
    if dropout_p is None:
        raise Refuse("SDPA with a non-constant dropout_p")
    plan.dropout_p = dropout_p
    causal = args["is_causal"]
    if causal is True:
        nq, nk = _tensor(q).shape[-2], _tensor(k).shape[-2]
        if not layout.known_equal(nq, nk):
            raise Refuse("SDPA is_causal with Nq != Nk (top-left aligned, the op aligns bottom-right)")
        plan.causal = True
    elif causal is not False:
        raise Refuse("SDPA with a non-constant is_causal")
    if args["enable_gqa"] is True:
        hq, hk = _tensor(q).shape[-3], _tensor(k).shape[-3]
        if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
            raise Refuse(f"SDPA enable_gqa with {hq} query heads and {hk} key heads")
        plan.k.group = plan.v.group = hq // hk
    plan.zero_empty_rows = True
    return plan
