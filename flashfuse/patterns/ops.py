"""One vocabulary for the many spellings of each op in a Dynamo graph: the only module that names
torch functions, Tensor methods and operators as graph targets.

`classify(node)` maps a torch-level FX node (a function, a Tensor method, an operator, in place
or not) to an `Op(kind, args)` with its arguments normalized, or None for anything else; the
score chain is reasoned about in these kinds. The target sets below serve the proofs that look at
other ops (layout.py: views and transposes; structure.py: index arithmetic; inplace.py): they ask
`target(node) in ops.SET`.
"""
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import Node


@dataclass
class Op:
    kind: str
    args: dict = field(default_factory=dict)
    inplace: bool = False


def _targets(*names_and_fns):
    return set(names_and_fns)


MATMUL = _targets(torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__")
BADDBMM = _targets(torch.baddbmm, "baddbmm")
_aten = torch.ops.aten
MUL = _targets(torch.mul, operator.mul, torch.multiply, "mul", "__mul__", "multiply", "__rmul__", _aten.mul.Tensor,
               _aten.mul.Scalar)
DIV = _targets(torch.div, operator.truediv, torch.true_divide, torch.divide, "div", "true_divide", "divide",
               "__truediv__")
ADD = _targets(torch.add, operator.add, "add", "__add__", "__radd__")
SUB = _targets(torch.sub, operator.sub, torch.subtract, "sub", "subtract", "__sub__")
SOFTMAX = _targets(torch.softmax, F.softmax, torch.special.softmax, "softmax")
SAFE_SOFTMAX = _targets(_aten._safe_softmax, _aten._safe_softmax.default)  # SDPA math: a row of -inf gives 0
MASKED_FILL = _targets(torch.masked_fill, "masked_fill")
WHERE = _targets(torch.where, "where")
TANH = _targets(torch.tanh, F.tanh, "tanh")
MAXIMUM = _targets(torch.maximum, "maximum")  # on ties, each side gets half the gradient
CLAMP_MIN = _targets(torch.clamp_min, "clamp_min")  # on ties, x gets all of it
CLAMP = _targets(torch.clamp, torch.clip, "clamp", "clip")
DROPOUT = _targets(F.dropout, torch.dropout, "dropout")
EINSUM = _targets(torch.einsum, torch.functional.einsum)
SDPA = _targets(F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
INPLACE = {operator.imul: MUL, operator.itruediv: DIV, operator.iadd: ADD, operator.isub: SUB,
           operator.imatmul: MATMUL}


# -- layout: ops that move, copy or view dims (layout.py, match.py, rewrite.py) ----------------------------------
SAME_DIMS = _targets("contiguous", "clone", "float", "half", "bfloat16", "double", "to", "type", "type_as", "neg",
                     "__neg__", operator.neg, torch.neg, torch.clone, "detach", torch.detach)
ELEMENTWISE = _targets(operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub,
                       torch.div, "add", "mul", "sub", "div", "__add__", "__mul__", "__sub__", "__truediv__",
                       _aten.mul.Tensor, _aten.mul.Scalar)
TRANSPOSE = _targets("transpose", torch.transpose, "swapaxes", "swapdims")
VIEW_AS_COMPLEX = _targets(torch.view_as_complex)  # (..., n, 2) real -> (..., n) complex: rotary embeddings
VIEW_AS_REAL = _targets(torch.view_as_real)  # (..., n) complex -> (..., n, 2) real
MATRIX_TRANSPOSE = _targets("mT", getattr(torch.ops.aten, "mT", "mT"))
PERMUTE = _targets("permute", torch.permute)
MOVEDIM = _targets("movedim", "moveaxis", torch.movedim, torch.moveaxis)
REPEAT_INTERLEAVE = _targets("repeat_interleave", torch.repeat_interleave)
UNSQUEEZE = _targets("unsqueeze", torch.unsqueeze)
EXPAND = _targets("expand", "expand_as")
RESHAPE = _targets("view", "reshape", torch.reshape, "flatten", "unflatten", "view_as", "reshape_as")
PLAIN_RESHAPE = _targets("reshape", "view", torch.reshape)
SPLIT = _targets("split", "chunk", "unbind", torch.split, torch.chunk, torch.unbind)
UNBIND = _targets("unbind", torch.unbind)
CAT = _targets(torch.cat, torch.concat)
STACK = _targets(torch.stack)
ROW_MAX = _targets(torch.amax, "amax")
ROW_MAX_WITH_INDEX = _targets(torch.max, "max")
GETITEM = _targets(operator.getitem)
#: Tensor methods that only relabel dims, which a scale on q or k may sit under (match.py)
VIEW_METHODS = _targets("view", "reshape", "transpose", "permute", "contiguous")
#: views the rewrite erases once they feed nothing
REMOVABLE_VIEWS = _targets("transpose", "permute", "view", "reshape", "contiguous", "unsqueeze", "expand", "mT",
                           torch.transpose, getattr(torch.ops.aten, "mT", "mT"), torch.unsqueeze)

# -- index arithmetic: masks built from positions (structure.py) -------------------------------------------------
AND = _targets(operator.and_, torch.logical_and, torch.bitwise_and, "__and__", "logical_and", "bitwise_and")
OR = _targets(operator.or_, torch.logical_or, torch.bitwise_or, "__or__", "logical_or", "bitwise_or")
NOT = _targets(operator.invert, torch.logical_not, torch.bitwise_not, "__invert__", "logical_not", "bitwise_not")
MASK_PASS = _targets("to", "expand", "contiguous", "bool")
REPEAT = _targets("repeat")
COMPARE = {operator.le: "le", torch.le: "le", "le": "le", operator.lt: "lt", torch.lt: "lt", "lt": "lt",
           operator.ge: "ge", torch.ge: "ge", "ge": "ge", operator.gt: "gt", torch.gt: "gt", "gt": "gt"}
EQUAL = {operator.eq: "eq", torch.eq: "eq", "eq": "eq", operator.ne: "ne", torch.ne: "ne", "ne": "ne"}
#: ops whose value is not a function of their inputs: a mask term computed with one is never evaluated
RANDOM = _targets(torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
                  torch.randperm, torch.bernoulli, torch.normal, torch.multinomial, torch.empty, torch.empty_like,
                  "bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "new_empty")
PLUS = _targets(operator.add, torch.add)
MINUS = _targets(operator.sub, torch.sub)
ABS = _targets(operator.abs, torch.abs, "abs")
ARANGE = _targets(torch.arange)
ZEROS_LIKE = torch.zeros_like
ZEROS = _targets(torch.zeros, ZEROS_LIKE)
ONES_METHOD = "new_ones"

# -- constants built in the graph (plan.constant) ----------------------------------------------------------------
FULL = _targets(torch.full)
TENSOR = _targets(torch.tensor, torch.as_tensor)
SCALAR_MATH = _targets(math.sqrt, operator.truediv, operator.mul, operator.pow)
SCALAR_CASTS = _targets("to", "type")

# -- in place (inplace.py) ---------------------------------------------------------------------------------------
OUT_OF_PLACE = {operator.imul: operator.mul, operator.itruediv: operator.truediv, operator.iadd: operator.add,
                operator.isub: operator.sub}
#: methods that read only their argument's shape or dtype
METADATA_ONLY = _targets("type_as", "expand_as", "view_as", "reshape_as", "size", "dim", "new_zeros", "new_ones",
                         "new_empty", "new_full", "new_tensor")


#: higher-order ops that call their body subgraph as body(*operands): activation checkpointing, Dynamo's wrap
_higher = torch.ops.higher_order
BODY_CALLS = {getattr(_higher, name) for name in ("tag_activation_checkpoint", "wrap") if hasattr(_higher, name)}
#: the meta key linking a subgraph's input to the node its caller passes (passes.py sets it)
OUTER = "flashfuse_outer"


def outer(node):
    """For an input of a subgraph whose caller passes a known node (a checkpointed block's mask, built in the
    calling graph), that node; else node itself. The proofs read through it; rewrite imports what they use."""
    if isinstance(node, Node) and node.op == "placeholder":
        return node.meta.get(OUTER, node)
    return node


def target(node):
    """The function, or the method name, a call node runs; None for other nodes."""
    if isinstance(node, Node) and node.op in ("call_function", "call_method"):
        return node.target
    return None


def _arg(node, index, name, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def classify(node: Node):
    """Return the Op a node performs, or None if it is none of the ops the matcher knows."""
    if node.op not in ("call_function", "call_method"):
        return None
    key = target(node)
    inplace = False
    if key in INPLACE:
        key, inplace = next(iter(INPLACE[key])), True
    elif node.op == "call_method" and isinstance(key, str) and key.endswith("_") and not key.startswith("__"):
        key, inplace = key[:-1], True
    try:
        op = _classify(node, key)
    except (TypeError, ValueError, IndexError):
        return None
    if op is not None:
        op.inplace = inplace
    return op


def _classify(node, key):  # noqa: C901  (one table of spellings)
    a = node.args
    if key in MATMUL:
        return Op("matmul", {"a": a[0], "b": _arg(node, 1, "other")})
    if key in BADDBMM:
        return Op("baddbmm", {"input": a[0], "a": _arg(node, 1, "batch1"), "b": _arg(node, 2, "batch2"),
                              "beta": node.kwargs.get("beta", 1), "alpha": node.kwargs.get("alpha", 1)})
    if key in EINSUM:
        operands = a[1:] if len(a) > 2 else list(a[1])
        return Op("einsum", {"equation": a[0], "operands": list(operands)})
    if key in MUL:
        return Op("mul", {"x": a[0], "y": _arg(node, 1, "other")})
    if key in DIV:
        if node.kwargs.get("rounding_mode") is not None:
            return None
        return Op("div", {"x": a[0], "y": _arg(node, 1, "other")})
    if key in ADD or key in SUB:
        alpha = node.kwargs.get("alpha", 1)
        return Op("add" if key in ADD else "sub", {"x": a[0], "y": _arg(node, 1, "other"), "alpha": alpha})
    if key in SOFTMAX or key in SAFE_SOFTMAX:
        return Op("softmax", {"x": a[0], "dim": _arg(node, 1, "dim"), "dtype": _softmax_dtype(node),
                              "safe": key in SAFE_SOFTMAX})
    if key in MASKED_FILL:
        return Op("masked_fill", {"x": a[0], "mask": _arg(node, 1, "mask"), "value": _arg(node, 2, "value")})
    if key in WHERE and len(a) + len(node.kwargs) == 3:
        return Op("where", {"cond": a[0], "a": _arg(node, 1, "input"), "b": _arg(node, 2, "other")})
    if key in TANH:
        return Op("tanh", {"x": a[0]})
    if key in MAXIMUM or (key in ROW_MAX_WITH_INDEX and len(a) == 2 and isinstance(meta(a[1]), torch.Tensor)):
        return Op("clamp_min", {"x": a[0], "min": _arg(node, 1, "other"), "halves_ties": True})  # torch.max(x, t)
    if key in CLAMP_MIN or (key in CLAMP and _arg(node, 2, "max") is None and _arg(node, 1, "min") is not None):
        return Op("clamp_min", {"x": a[0], "min": _arg(node, 1, "min"), "halves_ties": False})
    if key in DROPOUT:
        if key is torch.dropout:
            return Op("dropout", {"x": a[0], "p": _arg(node, 1, "p"), "training": _arg(node, 2, "train")})
        training = _arg(node, 2, "training", True)
        return Op("dropout", {"x": a[0], "p": _arg(node, 1, "p", 0.5), "training": training})
    if key is torch.reshape:
        return Op("view", {"x": a[0]})
    if key in SDPA:
        return Op("sdpa", {"q": a[0], "k": _arg(node, 1, "key"), "v": _arg(node, 2, "value"),
                           "attn_mask": _arg(node, 3, "attn_mask"), "dropout_p": _arg(node, 4, "dropout_p", 0.0),
                           "is_causal": _arg(node, 5, "is_causal", False), "scale": _arg(node, 6, "scale"),
                           "enable_gqa": node.kwargs.get("enable_gqa", False)})
    if node.op == "call_method":
        return _classify_method(node, key)
    return None


def _classify_method(node, key):
    a = node.args
    if key in ("view", "reshape") and len(a) >= 2 and not node.kwargs:
        return Op("view", {"x": a[0]})
    if key in CAST_METHODS and len(a) == 1:
        return Op("cast", {"x": a[0], "dtype": CAST_METHODS[key]})
    if key in ("to", "type") and len(a) == 2 and isinstance(a[1], torch.dtype) and not node.kwargs:
        return Op("cast", {"x": a[0], "dtype": a[1]})
    if key == "to" and len(a) == 1 and set(node.kwargs) == {"dtype"}:
        return Op("cast", {"x": a[0], "dtype": node.kwargs["dtype"]})
    if key in ("type_as", "to") and len(a) == 2 and isinstance(a[1], Node) and not node.kwargs:
        return Op("cast", {"x": a[0], "like": a[1]})
    return None


def _softmax_dtype(node):
    if "dtype" in node.kwargs:
        return node.kwargs["dtype"]
    if node.op == "call_function" and node.target is F.softmax and len(node.args) > 3:
        return node.args[3]
    if node.op == "call_function" and node.target in SAFE_SOFTMAX and len(node.args) > 2:
        return node.args[2]
    return None


def meta(node):
    """The FakeTensor (or SymInt / value) Dynamo recorded for a node, or None."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))
