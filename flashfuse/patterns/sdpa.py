"""Existing F.scaled_dot_product_attention calls, routed to the op as a Plan."""
import torch

from flashfuse.patterns import layout
from flashfuse.patterns.ops import classify
from flashfuse.patterns.plan import Operand, Plan, Refuse, constant, shape_of, tensor_of


def sdpa_plan(node) -> Plan:
    """Route an existing F.scaled_dot_product_attention call to the op."""
    args = classify(node).args
    q, k, v = args["q"], args["k"], args["v"]
    plan = Plan(None, None, node, Operand(q), Operand(k), Operand(v))
    ranks = {(tensor_of(x).dim() if tensor_of(x) is not None else -1) for x in (q, k, v)}
    if ranks not in ({4}, {3}):
        raise Refuse(f"SDPA operands of rank {sorted(ranks)}")
    plan.scores_shape = shape_of(q)[:-1] + (shape_of(k)[-2],)
    plan.scores_node = plan.p = q
    scale = constant(args["scale"]) if args["scale"] is not None else tensor_of(q).shape[-1] ** -0.5
    if scale is None:
        raise Refuse("SDPA with a non-constant scale")
    plan.update(scale=float(scale), empty_rows="zero")  # SDPA: a query that sees no key gives 0
    mask = args["attn_mask"]
    if mask is not None:
        t = tensor_of(mask)
        if t is None:
            raise Refuse("SDPA attn_mask without shape information")
        if t.dtype == torch.bool:
            plan.masks.append((mask, True, plan.scores_shape))
        else:
            plan.bias.append((mask, 1.0, plan.scores_shape))
    dropout_p = constant(args["dropout_p"])
    if dropout_p is None:
        raise Refuse("SDPA with a non-constant dropout_p")
    plan.update(dropout_p=dropout_p)
    causal = args["is_causal"]
    if causal is True:
        nq, nk = tensor_of(q).shape[-2], tensor_of(k).shape[-2]
        if not layout.known_equal(nq, nk):
            raise Refuse("SDPA is_causal with Nq != Nk (top-left aligned, the op aligns bottom-right)")
        plan.update(causal=True)
    elif causal is not False:
        raise Refuse("SDPA with a non-constant is_causal")
    if args["enable_gqa"] is True:
        hq, hk = tensor_of(q).shape[-3], tensor_of(k).shape[-3]
        if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
            raise Refuse(f"SDPA enable_gqa with {hq} query heads and {hk} key heads")
        plan.k.group = plan.v.group = hq // hk
    return plan
