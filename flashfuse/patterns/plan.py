"""What the matcher builds for a site (`Plan`, `Operand`), why it refuses one (`Refuse`), and the
small questions it asks of graph values: their tensors, shapes, constants and users.
"""
from dataclasses import dataclass, field

import torch
from torch.fx import Node

from flashfuse.kernels.spec import AttentionSpec
from flashfuse.patterns import layout, ops
from flashfuse.patterns.inplace import metadata_only_use
from flashfuse.patterns.ops import meta


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
    spec: AttentionSpec = AttentionSpec()  # the scalars proven so far (replaced, never mutated)
    scale_tensors: list = field(default_factory=list)  # [(node, "mul" | "div")], 0-dim, applied to q
    bias: list = field(default_factory=list)  # [(node, coefficient, shape of the scores it was added to)]
    masks: list = field(default_factory=list)  # [(bool node, keeps: True marks keys kept, shape of the scores)]
    scores_shape: tuple = ()  # the layout the softmax sees; q, k, v, bias and mask are brought to it
    scores_node: Node = None  # a node of that shape, for its sizes
    p: Node = None  # the weights as p.v reads them
    sink: Node = None  # an attention sink's logits (..., Nq, 1) in the scores' layout (sinks.py), or None
    mask_note: str = ""  # the mask as found, for reports: "key_padding", or "tensor: why no structure was proven"
    stacked: tuple = None  # a bias term added after a finite mask fill (chain.fold; match._take_stacked)
    halved_ties: bool = False  # torch.max(scores, finfo.min) after a bias: tied scores get half their gradient
    bypass: list = field(default_factory=list)  # scalar mul/div nodes on q/k folded into `scale`
    seed: Node = None  # the dropout seed, when drawn outside this graph (passes._import_seed); else drawn here
    chain: list = field(default_factory=list)  # nodes made dead by the rewrite

    def update(self, **changes):
        """Replace fields of the spec (a frozen AttentionSpec)."""
        self.spec = self.spec.replace(**changes)

    def operands(self):
        """What the op is handed besides q, k, v, for reports: bias, mask, GQA group, a runtime scale."""
        return {"bias": bool(self.bias), "mask": bool(self.masks), "gqa": max(self.k.group, 1) if self.k else 1,
                "runtime_scale": bool(self.scale_tensors), "mask_note": self.mask_note, "sink": self.sink is not None}


def shape_of(node):
    return tuple(meta(node).shape)


def keeps_last_two(view):
    """A view of the scores that only regroups batch dims: (B*H, Nq, Nk) <-> (B, H, Nq, Nk)."""
    src, out = meta(view.args[0]), meta(view)
    if not isinstance(src, torch.Tensor) or src.dim() < 2 or out.dim() < 2 or out.dim() > 5:
        return False
    return layout.known_equal(src.shape[-1], out.shape[-1]) and layout.known_equal(src.shape[-2], out.shape[-2])


def tensor_of(x):
    t = meta(x)
    return t if isinstance(t, torch.Tensor) else None


def real_users(node):
    return [u for u in node.users if not metadata_only_use(u, node)]


def single_user(node, what):
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
    if op in ops.FULL and len(x.args) >= 2 and list(x.args[0]) == [] and isinstance(x.args[1], (int, float)):
        return float(x.args[1])
    if op in ops.TENSOR and x.args and isinstance(x.args[0], (int, float)):
        return float(x.args[0])
    if op in ops.SCALAR_MATH and all(
            isinstance(a, (int, float)) for a in x.args):
        return float(op(*x.args))
    if x.op == "call_method" and x.target in ops.SCALAR_CASTS and isinstance(x.args[0], Node):
        return constant(x.args[0])
    return None


def runtime_scalar(x):
    """A 0-dim float tensor, or a number Dynamo made a graph input (a SymFloat after recompiles)."""
    t = meta(x)
    if isinstance(t, torch.Tensor):
        return t.dim() == 0 and t.is_floating_point()
    return isinstance(t, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(t, bool)
