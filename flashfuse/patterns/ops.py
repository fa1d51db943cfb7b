"""One vocabulary for the many spellings of each op in a Dynamo graph.

`classify(node)` maps a torch-level FX node (a function, a Tensor method, an operator, in place
or not) to an `Op(kind, args)` with its arguments normalized, or None for anything else.
The matcher only ever reasons about these kinds.
"""
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
MUL = _targets(torch.mul, operator.mul, torch.multiply, "mul", "__mul__", "multiply", "__rmul__")
DIV = _targets(torch.div, operator.truediv, torch.true_divide, torch.divide, "div", "true_divide", "divide",
               "__truediv__")
ADD = _targets(torch.add, operator.add, "add", "__add__", "__radd__")
SUB = _targets(torch.sub, operator.sub, torch.subtract, "sub", "subtract", "__sub__")
SOFTMAX = _targets(torch.softmax, F.softmax, torch.special.softmax, "softmax")
MASKED_FILL = _targets(torch.masked_fill, "masked_fill")
WHERE = _targets(torch.where, "where")
TANH = _targets(torch.tanh, F.tanh, "tanh")
DROPOUT = _targets(F.dropout, torch.dropout, "dropout")
EINSUM = _targets(torch.einsum, torch.functional.einsum)
SDPA = _targets(F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
INPLACE = {operator.imul: MUL, operator.itruediv: DIV, operator.iadd: ADD, operator.isub: SUB,
           operator.imatmul: MATMUL}


def target_key(node: Node):
    """The function, or the method name for call_method nodes."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
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
    key = target_key(node)
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
    if key in SOFTMAX:
        return Op("softmax", {"x": a[0], "dim": _arg(node, 1, "dim"), "dtype": _softmax_dtype(node)})
    if key in MASKED_FILL:
        return Op("masked_fill", {"x": a[0], "mask": _arg(node, 1, "mask"), "value": _arg(node, 2, "value")})
    if key in WHERE and len(a) + len(node.kwargs) == 3:
        return Op("where", {"cond": a[0], "a": _arg(node, 1, "input"), "b": _arg(node, 2, "other")})
    if key in TANH:
        return Op("tanh", {"x": a[0]})
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
    return None


def meta(node):
    """The FakeTensor (or SymInt / value) Dynamo recorded for a node, or None."""
    if not isinstance(node, Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))
