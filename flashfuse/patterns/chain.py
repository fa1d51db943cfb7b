"""The score chain between q.kT and the softmax, folded op by op into a Plan.

Kernel order is scale, softcap, bias, mask; each op of the chain either fits that order (scales
fold into the scalar and into earlier bias terms, a tanh between two multiplies is a softcap)
or the site is refused.
"""
import math

import torch
from torch.fx import Node

from flashfuse.patterns.ops import classify
from flashfuse.patterns.plan import Plan, Refuse, constant, keeps_last_two, runtime_scalar, shape_of, tensor_of
from flashfuse.patterns.products import score_product

LARGE_NEGATIVE = -1e4  # a fill at or below this hides a key: exp(fill - max) underflows to 0 in fp32
STACKED = "a bias added after a finite mask fill"  # the start of every reason for refusing one


def rounded(value, node):
    """A fill value as the scores' dtype holds it: finfo.min * 8 overflows to -inf there, as in eager."""
    return torch.tensor(value, dtype=torch.float64).to(tensor_of(node).dtype).item()


def _row_scale(other, scores):
    """A float tensor that scales whole score matrices (a learned per-head temperature of shape (H, 1, 1)): size 1
    on the query and key dims and no more dims than the scores, so multiplying q by it is the same product."""
    t, s = tensor_of(other), tensor_of(scores)
    if t is None or s is None or not t.is_floating_point() or t.dim() < 2 or t.dim() > s.dim():
        return False
    return t.shape[-1] == 1 and t.shape[-2] == 1


def chain_back(x, depth=0):
    """Ops from the product to the softmax input, product first; None if no product is reached."""
    if not isinstance(x, Node) or depth > 32:
        return None
    probe = Plan(None, None, None)
    try:
        if score_product(x, probe):
            return [x]
    except Refuse:
        return None
    op = classify(x)
    if op is None:
        return None
    candidates = {
        "mul": ("x", "y"), "div": ("x",), "add": ("x", "y"), "sub": ("x",), "masked_fill": ("x",),
        "where": ("a", "b"), "cast": ("x",), "tanh": ("x",), "view": ("x",), "clamp_min": ("x",),
    }.get(op.kind, ())
    if op.kind == "view" and not keeps_last_two(x):
        return None
    for name in candidates:
        path = chain_back(op.args.get(name), depth + 1)
        if path is not None:
            return path + [x]
    return None


def obstacle(x):
    """Why no q.kT product was found before the softmax: the first op, walking back along the scores (each op's
    first tensor input), that the chain cannot pass, named as the graph names it."""
    node = x
    for _ in range(32):
        if not isinstance(node, Node):
            return "the scores are not computed in this graph"
        op = classify(node)
        kind = op.kind if op is not None else None
        if kind not in ("mul", "div", "add", "sub", "masked_fill", "where", "cast", "tanh", "view", "clamp_min"):
            name = getattr(node.target, "__name__", node.target) if node.op != "placeholder" else "a graph input"
            if name == "cat":
                return (f"the scores are concatenated with another tensor ({node.name}): extra key columns, such as "
                        "attention sinks, are not supported")
            return f"the scores come from {name} ({node.name}), not a q.kT product"
        tensors = [a for a in node.args if isinstance(a, Node) and tensor_of(a) is not None]
        if not tensors:
            return f"the scores come from {node.name}"
        node = max(tensors, key=lambda a: tensor_of(a).dim())  # the scores, not a broadcast operand
    return "the chain before the softmax is too long"


def _clamp_is_identity(node, args, plan):
    """max(s, finfo.min), as XGLM writes it: the smallest finite number changes only -inf, so the clamp is no op
    when no -inf can reach it: no mask fills with -inf, and every bias is a finite where(keep, 0, fill)."""
    from flashfuse.patterns.structure import additive_mask  # structure.py builds on this module
    c, t = constant(args["min"]), tensor_of(node)
    if c is None or t is None or not t.is_floating_point() or rounded(c, node) != torch.finfo(t.dtype).min:
        raise Refuse(f"scores clamped from below at {args['min']}, not at the smallest finite number")
    if plan.masks and not math.isfinite(plan.spec.mask_value):
        raise Refuse("scores clamped at finfo.min after a -inf mask fill (the clamp turns it finite)")
    for term, coeff, _ in plan.bias:
        found = additive_mask(term, coeff)
        if found is None or not math.isfinite(found[2]):
            raise Refuse("scores clamped at finfo.min after a bias that may hold -inf (the clamp would change it)")
    plan.halved_ties = plan.halved_ties or bool(args["halves_ties"] and plan.bias)


def fold(node, prev, plan, state):  # noqa: C901  (one branch per kind of op on the chain)
    """Fold one chain op (whose chain input is `prev`) into the plan."""
    op = classify(node)
    kind, args = op.kind, op.args
    if plan.stacked is not None and kind not in ("cast", "view"):
        raise Refuse(f"{STACKED}, then {node.name}: only the softmax may follow it")
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
            plan.update(softcap=c, scale=plan.spec.scale * c)
            state["tanh"] = False
            state["capped"] = True
            return
        if c is None:
            if not (runtime_scalar(other) or _row_scale(other, prev)):
                raise Refuse(f"scores multiplied by a tensor of shape {tuple(tensor_of(other).shape)}: only a "
                             "scalar, or a scale per batch / head (size 1 on the query and key dims), is a scale"
                             if tensor_of(other) is not None else "scores multiplied by an unknown value")
            if plan.bias or plan.masks or plan.spec.softcap:
                raise Refuse("a tensor scale applied after a bias, mask or softcap")
            if not runtime_scalar(other) and shape_of(prev) != tuple(plan.scores_shape):
                raise Refuse("a per-head scale applied in a layout the softmax regroups")
            plan.scale_tensors.append((other, kind))
            return
        c = 1.0 / c if kind == "div" else c
        if not math.isfinite(c) or c == 0:
            raise Refuse(f"scale {c} is not a finite nonzero number")
        if state.get("capped"):
            raise Refuse("a scale applied after the softcap")
        if plan.masks and c < 0:
            raise Refuse("a negative scale after a mask")
        plan.update(scale=plan.spec.scale * c)
        plan.bias = [(b, w * c, shape) for b, w, shape in plan.bias]
        if plan.masks:
            plan.update(mask_value=rounded(plan.spec.mask_value * c, node))
        return
    if kind == "tanh":
        if plan.bias or plan.masks or state.get("capped"):
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
        t = tensor_of(other)
        if t is None or not t.is_floating_point():
            raise Refuse("scores added to a non-float value")
        plan.bias.append((other, sign, shape_of(prev)))
        if plan.masks and math.isfinite(plan.spec.mask_value):
            plan.stacked = plan.bias[-1]  # the op adds bias before it masks: match._take_stacked decides
        return
    if kind == "clamp_min":
        _clamp_is_identity(node, args, plan)
        return
    if kind in ("masked_fill", "where"):
        if kind == "masked_fill":
            mask, fill, keeps = args["mask"], args["value"], False  # True in the mask hides the key
        elif args["a"] is prev:
            mask, fill, keeps = args["cond"], args["b"], True  # where(mask, scores, fill): True keeps it
        else:
            mask, fill, keeps = args["cond"], args["a"], False
        value = constant(fill)
        if value is None or not (value <= LARGE_NEGATIVE):
            raise Refuse(f"masked_fill/where with value {fill} is not a mask (needs -inf or a large negative)")
        value = rounded(value, node)  # -1e4 is -9984 in bf16
        t = tensor_of(mask)
        if t is None or t.dtype != torch.bool:
            raise Refuse("a mask that is not a bool tensor")
        if plan.masks and value != plan.spec.mask_value:
            raise Refuse("two masks with different fill values")
        plan.masks.append((mask, keeps, shape_of(prev)))
        plan.update(mask_value=value)
        return
    raise Refuse(f"unsupported op {node.name} between the product and the softmax")
