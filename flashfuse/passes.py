"""The graph pass: find every attention site in a Dynamo graph and rewrite the proven ones.

`rewrite_graph(gm)` never raises: a site that cannot be proven, or that fails while being
rewritten, stays as it was and its `Site` says why; an error that escapes a site restores the
whole graph and logs a warning.
"""
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from flashfuse.kernels import op as flash_op
from flashfuse.kernels.spec import AttentionSpec
from flashfuse.patterns import ops, rewrite
from flashfuse.patterns.inplace import functionalize_inplace
from flashfuse.patterns.match import Refuse, is_attention, is_softmax, match_softmax, sdpa_plan
from flashfuse.patterns.ops import classify, meta

log = logging.getLogger("flashfuse")


@dataclass
class Site:
    """One softmax (or SDPA call) found in a graph."""
    node: str
    kind: str  # "softmax" or "sdpa"
    rewritten: bool
    reason: Optional[str] = None
    spec: Optional[AttentionSpec] = None  # what the matcher proved (set once a plan is found)
    operands: dict = field(default_factory=dict)  # bias, mask, gqa, runtime_scale (Plan.operands)
    shape: Optional[tuple] = None
    path: tuple = ("triton", "")  # (implementation the op will run, why when it is not the Triton kernels)
    attention: bool = True  # False: a softmax with no q.kT product before it and no p.v product after (a router)
    note: str = ""  # on a rewritten site: why an option asked for does not apply (fp8 off: ...)

    def describe(self):
        """The spec and operands in short text, e.g. `scale=0.125 causal key_padding gqa=4`: the mask as found is
        `causal` / `window=(l, r)` in the spec, `key_padding` (a (B, 1, 1, Nk) mask), or a tensor with the reason
        no structure was proven."""
        if self.spec is None:
            return ""
        note = self.operands.get("mask_note", "")
        extra = [name for name in ("bias", "mask", "runtime_scale", "sink") if self.operands.get(name)]
        if note == "key_padding":
            extra = [name if name != "mask" else note for name in extra]
        elif note:
            extra.append(f"[mask {note}]")
        if self.operands.get("gqa", 1) > 1:
            extra.append(f"gqa={self.operands['gqa']}")
        if self.note:
            extra.append(f"[{self.note}]")
        return " ".join([self.spec.describe(), *extra])


def rewrite_graph(gm: torch.fx.GraphModule, sdpa: bool = True, fp8=False, training: bool = True, _prefix: str = "",
                  _call=None, _depth=0) -> list:
    """Rewrite gm in place; return a Site for every softmax and SDPA call found. Subgraphs that gm calls (the
    body of activation checkpointing, of a cond or a wrapper) are rewritten too, each on its own. fp8: True runs
    the sites in FP8 where they can (no bias, no dropout); a string says why none can (the graph needs gradients).
    training: False takes the graph as inference whatever its example values say (flashfuse.export), so no site
    keeps a rounding residual for a backward (spec.fp32_delta)."""
    backup, call_args = _copy_graph(gm.graph), _call.args if _call is not None else None
    try:
        sites = _rewrite(gm, sdpa, fp8, training, _prefix, _call, _depth)
        gm.graph.lint()
        gm.recompile()
    except Exception as exc:  # the pass must never break the user's compilation
        log.warning("flashfuse: leaving this graph unchanged after an internal error: %r", exc)
        gm.graph = backup
        gm.recompile()
        if _call is not None:
            _call.args = call_args  # operands this graph imported from its caller
            _drop_seeds(_call.graph)
        sites = [Site(_prefix + n.name, "softmax", False, f"internal error: {exc!r}") for n in gm.graph.nodes
                 if is_softmax(n)]
    subgraphs = _subgraphs(gm)
    for name, sub, call in subgraphs:
        sites += rewrite_graph(sub, sdpa, fp8, training, f"{_prefix}{name}.", call, _depth + 1)
    if subgraphs:
        gm.recompile()  # a subgraph may have taken a new operand from its call here
    return sites


def _subgraphs(gm):
    """(attribute name, GraphModule, the one call of it or None) for each graph module gm's nodes read with
    get_attr. A body called once as body(*operands) gets its inputs linked to the operands (ops.outer)."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target in found:
            continue
        sub = getattr(gm, node.target, None)
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        call = next(iter(node.users)) if len(node.users) == 1 else None
        inputs = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if (call is None or call.target not in ops.BODY_CALLS or call.args[:1] != (node,)
                or len(call.args) != len(inputs) + 1):
            call = None
        for placeholder, operand in zip(inputs, call.args[1:] if call is not None else ()):
            if isinstance(operand, torch.fx.Node):
                placeholder.meta[ops.OUTER] = operand
        found[node.target] = (sub, call)
    return [(name, sub, call) for name, (sub, call) in found.items()]


def _import_operands(graph, plan, call):
    """Mask operands the proofs found in the calling graph (ops.outer) become new inputs of this subgraph, passed
    by its call: the key padding of a checkpointed block's mask, instead of the N x N mask it was given."""
    for i, (node, keep, layout) in enumerate(plan.masks):
        if node.graph is graph:
            continue
        if call is None or node.graph is not call.graph:
            raise Refuse("a mask term from a graph that does not call this one")
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        placeholder = next((n for n in inputs if n.meta.get(ops.OUTER) is node), None)  # passed already
        if placeholder is None:
            with graph.inserting_after(inputs[-1]):
                placeholder = graph.placeholder(f"flashfuse_{node.name}")
            placeholder.meta.update({key: node.meta[key] for key in ("example_value", "val") if key in node.meta})
            placeholder.meta[ops.OUTER] = node
            call.args = (*call.args, node)
        plan.masks[i] = (placeholder, keep, layout)


def _import_seed(graph, plan, call, depth):
    """A dropout site inside a subgraph gets its seed from the calling graph, as one more operand of the call: a
    checkpointed body is run again for the backward, and the rerun must draw the mask the forward drew. A seed
    passed in is the same tensor on both runs; one drawn inside would be drawn again. Only a body the top-level
    graph calls (deeper, the caller may itself be rerun)."""
    if call is None or depth != 1:
        raise Refuse("dropout inside a subgraph that the top-level graph does not call as body(*operands): a "
                     "rerun of the subgraph would draw another dropout mask")
    device = meta(plan.q.node).device
    like = next((a for a in call.args[1:] if isinstance(meta(a), torch.Tensor) and meta(a).device == device), None)
    if like is None:
        raise Refuse(f"dropout inside a subgraph whose call passes no tensor on {device} to draw its seed beside")
    with call.graph.inserting_before(call):
        seed = call.graph.call_function(flash_op.new_seed, (like,))
    seed.meta["example_value"] = rewrite.fake_value(flash_op.new_seed, like)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(inputs[-1]):
        placeholder = graph.placeholder(f"flashfuse_seed_{plan.output.name}")
    placeholder.meta["example_value"] = seed.meta["example_value"]
    call.args = (*call.args, seed)
    plan.seed = placeholder


def _drop_seeds(graph):
    """Seeds _import_seed drew in `graph` for a subgraph whose rewrite was undone."""
    for node in list(graph.nodes):
        if node.target is flash_op.new_seed and not node.users:
            graph.erase_node(node)


def _fp8(plan, fp8):
    """Put the plan in FP8 when asked and it can run there; else the note that says why not."""
    if not fp8:
        return ""
    why = fp8 if isinstance(fp8, str) else "a bias" if plan.bias else "dropout" if plan.spec.random else ""
    if why:
        return f"fp8 off: {why}"
    plan.update(fp8="incoherent")
    return ""


def _training(plan):
    """A site whose output needs a gradient, in half precision, keeps out's rounding residual for the backward
    (spec.fp32_delta). Dynamo's example values carry requires_grad as the traced grad mode left it."""
    out = meta(plan.output)
    if isinstance(out, torch.Tensor):
        plan.spec = flash_op.training_spec(plan.spec, out.dtype, out.requires_grad)


def _rewrite(gm, sdpa, fp8=False, training=True, prefix="", call=None, depth=0):
    functionalize_inplace(gm.graph)
    sites = []
    for node in list(gm.graph.nodes):
        op = classify(node)
        if op is None or op.kind not in ("softmax", "sdpa") or (op.kind == "sdpa" and not sdpa):
            continue
        site = Site(prefix + node.name, op.kind, False, shape=_shape(node))
        try:
            plan = match_softmax(node) if op.kind == "softmax" else sdpa_plan(node)
            _import_operands(gm.graph, plan, call)
            site.note = _fp8(plan, fp8)
            if training:
                _training(plan)
            site.spec, site.operands = plan.spec, plan.operands()
            site.path = _path(plan)
            args = call.args if call is not None else None
            if depth and plan.spec.random:
                _import_seed(gm.graph, plan, call, depth)
            try:
                rewrite.apply(gm.graph, plan)
            except Exception:
                if plan.seed is not None:  # the seed's operand and placeholder go with the failed rewrite
                    call.args = args
                    _drop_seeds(call.graph)
                    gm.graph.erase_node(plan.seed)
                raise
            site.rewritten = True
            log.info("flashfuse: rewrote %s %s as %s", op.kind, site.node, site.describe())
        except Refuse as why:
            site.reason = str(why)
            site.attention = _is_attention(node)
            log.info("flashfuse: left %s %s as it was: %s", op.kind, site.node, why)
        except Exception as exc:
            site.reason = f"internal error: {exc!r}"
            log.warning("flashfuse: left %s %s as it was after an internal error: %r", op.kind, site.node, exc)
        sites.append(site)
    return sites


def _is_attention(node):
    try:
        return is_attention(node)
    except Exception:  # a report detail must not cost the user's graph: count it as attention
        return True


def _path(plan):
    q, v = plan.q.node.meta.get("example_value"), plan.v.node.meta.get("example_value")
    if not isinstance(q, torch.Tensor) or not isinstance(v, torch.Tensor):
        return ("triton", "")
    return flash_op.path(q, v)


def _shape(node):
    val = node.meta.get("example_value")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _copy_graph(graph):
    copy = torch.fx.Graph(owning_module=graph.owning_module)
    copy._codegen = graph._codegen
    old_to_new = {}
    out = copy.graph_copy(graph, old_to_new)
    copy.output(out)
    for old, new in old_to_new.items():  # extras callers hang on nodes (Dynamo's _dynamo_source)
        for key, value in vars(old).items():
            if key not in vars(new):
                setattr(new, key, value)
    return copy
