"""The matcher: anchor at each softmax, prove the attention around it, describe it as one spec.

For a softmax node it walks back through the score chain to the q.kT product and forward to the
p.v product, folding every op on the way into a `Plan`: scale, softcap, bias terms, mask, dropout,
the q/k/v nodes in (..., N, D) layout and how to make them 4-D. Any step it cannot prove raises
`Refuse` with a reason in plain words, and the site stays as it was.
"""
import math

import torch
from torch.fx import Node

from flashfuse.kernels.spec import HUGE_FILL
from flashfuse.patterns import layout, ops, sinks
from flashfuse.patterns.chain import STACKED, chain_back, fold, obstacle, rounded
from flashfuse.patterns.ops import classify
from flashfuse.patterns.plan import Operand, Plan, Refuse, constant, keeps_last_two, real_users, single_user, tensor_of
from flashfuse.patterns.products import score_product, value_product
from flashfuse.patterns.sdpa import sdpa_plan as _sdpa_plan
from flashfuse.patterns.structure import additive_mask, decompose

__all__ = ["Refuse", "Plan", "match_softmax", "sdpa_plan", "is_softmax", "is_attention"]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def match_softmax(softmax):
    """Prove the attention around `softmax`; return a Plan or raise Refuse."""
    op = classify(softmax)
    x = op.args["x"]
    t = tensor_of(x)
    if t is None:
        raise Refuse("no shape information for the scores")
    dim = op.args["dim"]
    if not isinstance(dim, int) or dim % t.dim() != t.dim() - 1:
        raise Refuse(f"softmax over dim {dim}, not the last (key) dim")
    x, sink, sink_nodes = sinks.peel(x)
    t = tensor_of(x)
    if t.dim() > 5 or t.dim() < 2:
        raise Refuse(f"scores of rank {t.dim()}: only (N, N), (B*H, N, N), (B, H, N, N) and (B, W, H, N, N) are "
                     "handled")
    path = chain_back(x)
    if path is None:
        raise Refuse(f"no q.kT product found before the softmax: {obstacle(x)}")
    plan = Plan(softmax, path[0], None, scores_shape=tuple(t.shape), scores_node=x, sink=sink)
    if op.args["safe"]:
        plan.update(empty_rows="zero")  # aten._safe_softmax: a query that sees no key gives 0
    score_product(path[0], plan)
    state = {}
    for prev, node in zip(path, path[1:]):
        single_user(prev, "the scores")
        fold(node, prev, plan, state)
    if state.get("tanh"):
        raise Refuse("tanh on the scores is not followed by a multiply (not a softcap)")
    single_user(path[-1], "the scores")
    plan.chain = list(path) + sink_nodes
    _take_structure(plan)
    if plan.halved_ties and (plan.spec.fill_adds or plan.bias):  # a bias the op adds passes all the gradient
        raise Refuse("torch.max(scores, finfo.min) after an additive mask: a fully hidden row's scores all tie with "
                     "finfo.min, and the max gives them half their gradient (clamp(min=...) keeps all of it)")
    if sink is not None and plan.spec.empty_rows == "nan":
        plan.update(empty_rows="zero")  # the sink takes all the weight of a query that sees no key: 0
    plan.output = _after_softmax(softmax, plan)
    _check_operands(plan)
    return plan


def sdpa_plan(node):
    """An existing F.scaled_dot_product_attention call as a Plan (sdpa.py), its mask taken apart into structure
    and key padding as a softmax site's is (transformers' default "sdpa" attention builds the same masks)."""
    plan = _sdpa_plan(node)
    _take_structure(plan)
    return plan


def _take_structure(plan):
    """The site's one mask, if it is causal / window structure and key padding: flags plus a (B, 1, 1, Nk)
    key mask instead of an N x N tensor. Otherwise it stays a tensor and plan.mask_note says why."""
    if plan.stacked is not None:
        _take_stacked(plan)
        return
    found = _the_mask(plan)
    if found is None:
        return
    cond, keeps, fill, remove = found
    parts = decompose(cond, keeps, *plan.scores_shape[-2:])
    if isinstance(parts, str):
        plan.mask_note = f"tensor: {parts}"
        return
    finite = bool(parts.keys) and math.isfinite(fill)
    if finite and plan.spec.empty_rows != "nan":
        plan.mask_note = f"tensor: a finite fill where this site's empty rows are {plan.spec.empty_rows!r}"
        return
    # The op hides structure with -inf where eager filled it: a query whose every key is filled (padded, or out of
    # the band) averages v over all Nk keys in eager, which empty_rows="average" restores. Without structure the
    # op fills exactly the keys eager fills, and the formula is eager's answer.
    average = finite and parts.window != (-1, -1)  # structure: causal or a window
    if math.isfinite(fill) and parts.window != (-1, -1) and any(t is not remove for t in plan.bias):
        # where the bias is -inf (or below the fill) on every key of a query's band, eager weighs the keys the
        # structure filled, which the op hides with -inf: exact only without such a bias
        plan.mask_note = ("tensor: a bias beside structure and a finite fill: where the bias is -inf on every key "
                          "of a query's band, eager weighs the filled keys")
        return
    adds = bool(finite and remove is not None)
    if adds and fill > HUGE_FILL:
        plan.mask_note = f"tensor: an additive fill {fill:g} does not swallow the scores of a fully hidden row"
        return
    if adds and (plan.spec.softcap or any(_needs_grad(t[0]) for t in plan.bias if t is not remove)):
        plan.mask_note = "tensor: a fully hidden row's gradient would reach a softcap or a learned bias"
        return
    layout = remove[2] if remove is not None else plan.masks[0][2]
    if remove is not None:
        plan.bias.remove(remove)
    _as_structure(plan, parts, layout, fill, **({"empty_rows": "average"} if average else {}), fill_adds=adds)


def _as_structure(plan, parts, layout, fill, **changes):
    """Hand the op a decomposed mask: causal / window flags, and its key terms (if any) as the op's mask, filled
    with `fill`, with the spec `changes` that come with them."""
    plan.masks = [(node, keep, layout) for node, keep in parts.keys]
    left, right = parts.window
    plan.update(causal=parts.causal, window=(left, -1 if parts.causal else right))
    if parts.keys:
        plan.update(mask_value=rounded(fill, plan.scores_node), **changes)
        plan.mask_note = "key_padding"


def _take_stacked(plan):
    """where(mask, s, fill) + T: a bias term T added after a finite mask fill. The op adds bias before it masks
    unless spec.bias_last, so the site takes one of two forms, or is refused.

    Structure, when the fill's mask and T are the same causal / window structure and T's keys term is
    where(keep, 0, fill2) with a fill that swallows the scores (GPT-Neo's spelling, written inline): a key the
    structure hides gets fill + fill2 (-inf, or far enough below fill2 to weigh 0), so the structure is the op's,
    and the keys term is key padding whose fill was added (fill_adds), a query that sees only padded keys taking
    the formula's uniform softmax over them (empty_rows "nan").

    Tensors otherwise (a causal buffer, as GPT-Neo's module holds it; transformers 4's `(1 - pad) * finfo.min`;
    a padding bias after a window fill): the mask and T as they are, with spec.bias_last, which is eager's formula
    itself, fully hidden rows included."""
    term = plan.stacked
    if len(plan.masks) != 1 or plan.sink is not None or plan.spec.empty_rows != "nan":
        raise Refuse(f"{STACKED}, with a second mask, a sink or a safe softmax")
    if _needs_grad(term[0]):
        raise Refuse(f"{STACKED}: a fully hidden row's gradient would reach a learned bias")
    if any(t is not term for t in plan.bias):  # a -inf in it would drop a padded key that eager's row still weighs
        raise Refuse(f"{STACKED} beside another bias: where it is -inf on a padded key, a query that sees only "
                     "padded keys weighs the others in eager, and all of them in the op")
    why = _stacked_structure(plan, term)
    if why is not None:
        plan.update(bias_last=True)
        plan.mask_note = f"tensor: the bias after the fill (bias_last), {why}"


def _stacked_structure(plan, term):
    """Hand the op the structure form of `_take_stacked`, or say why it does not hold (None: it does)."""
    found = additive_mask(term[0], term[1])
    if found is None or found[2] > HUGE_FILL:
        return "not where(keep, 0, fill) with a fill that swallows the scores"
    if plan.spec.softcap:
        return "after a softcap"  # fill_adds takes none
    node, keeps, _ = plan.masks[0]
    nq, nk = plan.scores_shape[-2:]
    structure, padded = decompose(node, keeps, nq, nk), decompose(found[0], found[1], nq, nk)
    for parts in (structure, padded):
        if isinstance(parts, str):
            return parts
    if structure.keys or structure.window != padded.window:
        return f"its structure {padded.window} not the fill's {structure.window}, or a fill with key terms"
    plan.bias.remove(term)
    _as_structure(plan, padded, term[2], found[2], fill_adds=True)
    if not padded.keys:
        plan.update(mask_value=float("-inf"))  # no mask left: the structure fill is the op's -inf
    return None


def _needs_grad(node):
    t = tensor_of(node)
    return t is None or t.requires_grad


def _the_mask(plan):
    """(cond, keeps, fill, bias term or None) for the site's one mask: a where/masked_fill on the scores, or an
    additive bias where(cond, 0, fill); None when there is none or more than one."""
    additive = [(term, found) for term in plan.bias if (found := additive_mask(term[0], term[1])) is not None]
    if plan.masks:
        if len(plan.masks) != 1 or additive:
            plan.mask_note = "tensor: more than one mask"
            return None
        node, keeps, _ = plan.masks[0]
        return node, keeps, plan.spec.mask_value, None
    if len(additive) != 1:
        if additive:
            plan.mask_note = "tensor: more than one mask"
        return None
    term, (cond, keeps, fill) = additive[0]
    return cond, keeps, fill, term


def _after_softmax(softmax, plan):
    p = softmax
    plan.chain.append(softmax)
    if plan.sink is not None:
        p = sinks.sliced_weights(softmax, plan.scores_shape[-1])
        plan.chain.append(p)
    while True:
        user = single_user(p, "the attention weights")
        op = classify(user)
        if op is not None and (op.kind == "cast" or (op.kind == "view" and keeps_last_two(user))) \
                and op.args["x"] is p:
            p = user
        elif op is not None and op.kind == "dropout" and op.args["x"] is p:
            rate, training = constant(op.args["p"]), op.args["training"]
            if rate is None or not isinstance(training, bool):
                raise Refuse("dropout with a non-constant rate or training flag")
            if training and rate > 0:
                plan.update(dropout_p=rate)
            p = user
        else:
            v = value_product(user, p)
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
        t = tensor_of(operand.node)
        if t is None or t.dtype not in _FLOAT_DTYPES:
            raise Refuse(f"{name} is not a float tensor")
    if not layout.is_feature_axis(q.node, -1):
        raise Refuse("the product does not contract q's feature (head) dim")
    k_dim = -2 if k.transpose else -1
    if not layout.is_feature_axis(k.node, k_dim):
        raise Refuse("the product does not contract k's feature (head) dim: k is not transposed")
    if not layout.is_feature_axis(v.node, -1) or layout.is_feature_axis(v.node, -2):
        raise Refuse("p.v does not contract v's token dim")
    for operand in (k, v):
        rows = layout.swapped_last_two(operand.node) if operand.transpose else None
        if rows is not None:  # k.transpose(-1, -2) handed to an einsum that contracts it back
            operand.node, operand.transpose = rows, False
    _fold_operand_scales(plan)  # after the peel: the folded multiplies are bypassed below plan's nodes
    for operand in (k, v):
        rows = layout.swapped_last_two(operand.node) if operand.transpose else None
        if rows is not None and not any(rows is m for _, m, _ in plan.bypass):  # a transpose under a folded scale
            operand.node, operand.transpose = rows, False
        if tensor_of(operand.node).dim() == 4:
            found = layout.unrepeat_kv(operand.node)
            if found is not None:
                operand.node, operand.group = found


def _fold_operand_scales(plan):
    """Fold constant scalar multiplies on q and k (timm, Whisper, BART, d^-0.25 on both) into the spec's scale.

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
                plan.update(scale=plan.spec.scale * factor)
                if child is None:
                    operand.node = src
                else:
                    plan.bypass.append((child, node, src))
                node = src
                continue
            if node.op == "call_method" and node.target in ops.VIEW_METHODS and isinstance(node.args[0], Node):
                child, node = node, node.args[0]
                continue
            break


def _scaled(node):
    """(x, c) if node is x * c or x / c with a constant scalar c; else (None, None)."""
    op = classify(node)
    if op is None or op.kind not in ("mul", "div") or op.inplace:
        return None, None
    x, y = op.args["x"], op.args["y"]
    if op.kind == "mul" and not isinstance(x, Node):
        x, y = y, x
    c = constant(y)
    if not isinstance(x, Node) or tensor_of(x) is None or c is None or c == 0 or not math.isfinite(c):
        return None, None
    if tensor_of(node) is None or tensor_of(x).dtype != tensor_of(node).dtype:
        return None, None
    return x, (1.0 / c if op.kind == "div" else c)


def feeds_product(softmax):
    """True when the softmax's weights reach a matmul-like product (through casts, views, slices, dropout): p.v."""
    pending, seen = list(softmax.users), 0
    while pending and seen < 64:
        user = pending.pop()
        seen += 1
        op = classify(user)
        if (op is not None and op.kind in ("cast", "view", "dropout")) or ops.target(user) in ops.GETITEM:
            pending += list(user.users)
        elif any(value_product(user, arg) is not None for arg in user.all_input_nodes):
            return True
    return False


def is_attention(softmax):
    """A softmax is attention when a q.kT product feeds it or its weights feed a p.v product; a router's softmax
    (a linear layer's logits, then top-k) is neither, and reports list it apart."""
    op = classify(softmax)
    return op.kind == "sdpa" or chain_back(op.args["x"]) is not None or feeds_product(softmax)


def is_softmax(node):
    op = classify(node)
    return op is not None and op.kind == "softmax"
