"""Random attention programs for fuzzing the matcher: `attention_programs()`, a Hypothesis strategy.

Each drawn `Program` is an `nn.Module` written as Python source text from a set of named choices
(how q/k/v are laid out, how the scores are produced, scaled, capped, biased and masked, which
softmax, dropout, GQA and output spelling), then exec'd, so `program.source` is exactly what runs:

    from hypothesis import given
    from flashfuse.testing import attention_programs, check_program

    @given(attention_programs())
    def test_matcher(program):
        check_program(program)        # rewritten sites == program.expected_sites, same outputs and grads

Attention programs use only spellings the matcher supports and must be rewritten once per site.
Near misses (`program.is_attention` False) take an attention program and change its meaning in
one place (softmax over queries, a missing transpose, weights returned, a small fill value...):
they must be left alone (0 sites) and still compute what eager does.

Every choice is drawn with `sampled_from` (sizes too: uniform, where `integers` favours the ends),
simplest option first, and the source is built from the choices alone, so Hypothesis shrinks a
failure to a short program. `build_program(choices)`
rebuilds a program from its `choices` dict, for regression tests.
"""
import copy
import linecache
import os
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from hypothesis import assume
from hypothesis import strategies as st

NEAR_MISSES = (
    "softmax_dim",          # softmax over the query dim
    "q_transposed",         # q.mT @ k.mT with Nq == D: contracts q's tokens
    "k_untransposed",       # q @ k (or k.mT.mT...) with Nk == D: contracts k's tokens
    "v_transposed",         # p @ v.mT with Nk == Dv: contracts v's features
    "weights_returned",     # the attention weights are returned too
    "weights_reused",       # the weights feed something besides p @ v
    "scores_reused",        # the pre-softmax scores are returned too
    "mask_after_softmax",   # weights masked after the softmax
    "small_fill",           # masked_fill with -5 (or -1, -100): not a mask
    "tanh_no_mul",          # tanh on the scores without the softcap multiply
    "bias_minus_scores",    # bias - scores
    "per_key_scale",        # scores times a (Nk,) tensor
    "log_softmax",          # log_softmax instead of softmax
    "manual_softmax",       # exp / sum, no softmax op
)
#: Near misses that need Nq == D, Nk == D or Nk == Dv so that the wrong contraction still type-checks.
_TOKEN_EQUALS_FEATURE = ("q_transposed", "k_untransposed", "v_transposed")
#: How a near miss transposes q or v (k: how it undoes k's transpose). The last three hide the transpose
#: from a reader that knows only transpose / permute / mT.
TRANSPOSES = ("mT", "transpose", "movedim", "moveaxis", "einsum")
K_UNTRANSPOSES = ("plain", "double_transpose", "movedim_mT", "moveaxis_mT", "einsum_mT")
_EXTRA_OUTPUT = ("weights_returned", "scores_reused")

LAYOUTS_4D = ("inputs", "proj", "inputs_bnhd", "fused_qkv")
LAYOUTS_3D = ("inputs3d", "proj3d")
LAYOUTS = LAYOUTS_4D + LAYOUTS_3D
_PROJ = ("proj", "fused_qkv", "proj3d")  # the layouts that start from hidden states x

# broadcast shapes of a bias or bool mask against the scores, right-aligned; "1" is a broadcast dim
PATTERNS_4D = ("BHQK", "B11K", "1H1K", "1HQK", "B1QK", "11QK", "QK", "K", "HQK", "1QK", "BH1K", "111K", "1")
PATTERNS_3D = ("XQK", "X1K", "1QK", "QK", "K", "11K", "1")  # X = B * H

FILLS = ("-inf", "finfo_min", "-1e4", "-1e9")
SMALL_FILLS = (-5.0, -1.0, -100.0)


@dataclass
class Program:
    """One drawn program. `module(*inputs)` runs it; `source` is the code of `module`'s class."""
    source: str
    module: torch.nn.Module
    inputs: tuple
    is_attention: bool
    expected_sites: int
    choices: dict = field(default_factory=dict)
    #: some query row sees no key: every key is hidden by a finite fill (finfo.min, -1e9, a padding bias)
    fully_masked_rows: bool = False

    def to(self, device) -> "Program":
        """The same program with its module and inputs on `device` (leaves stay leaves)."""
        def move(x):
            if not isinstance(x, torch.Tensor):
                return x
            return x.detach().to(device).requires_grad_(x.requires_grad)
        module = copy.deepcopy(self.module).to(device)
        return replace(self, module=module, inputs=tuple(move(x) for x in self.inputs))

    def __repr__(self):
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in self.inputs)
        kind = "attention" if self.is_attention else f"near miss ({self.choices.get('kind')})"
        return (f"Program({kind}, expected_sites={self.expected_sites}, inputs: {shapes}"
                f"{', fully masked rows' if self.fully_masked_rows else ''})\n{self.source}")


# ---------------------------------------------------------------- drawing the choices

class _Picker:
    """Draws named choices and records them, in draw order, in `values`."""

    def __init__(self, draw):
        self.draw, self.values = draw, {}

    def pick(self, name, options):
        value = self.draw(st.sampled_from(tuple(options)))
        self.values[name] = value
        return value

    def integer(self, name, lo, hi):
        """Uniform over lo..hi (st.integers favours the ends); shrinks to lo."""
        value = self.draw(st.sampled_from(range(lo, hi + 1)))
        self.values[name] = value
        return value

    def set(self, name, value):
        self.values[name] = value
        return value


def _scale_factor(value, op, d):
    """What a drawn scale (value, op) multiplies the scores by."""
    if value == "sqrt_d":
        return d ** -0.5
    return 1.0 / value if "div" in op else value


def _divisors_desc(n):
    return [d for d in range(n, 0, -1) if n % d == 0]


@st.composite
def _choices(draw, attention, dtypes, max_batch, max_heads, max_seq, head_dims, avoid):  # noqa: C901
    c = _Picker(draw)
    if attention is True:
        kind = c.set("kind", "attention")
    elif attention is False:
        kind = c.pick("kind", NEAR_MISSES)
    else:  # about half attention, half near misses
        kind = c.pick("kind", ("attention",) * len(NEAR_MISSES) + NEAR_MISSES)
    c.pick("dtype", dtypes)
    layout = c.pick("layout", LAYOUTS)
    three_d = layout in LAYOUTS_3D
    c.integer("B", 1, max_batch)
    h = c.integer("H", 1, max_heads)
    hkv = h if three_d else c.pick("HKV", _divisors_desc(h))
    d = c.pick("D", head_dims)
    fused_forms = ("unbind", "index", "chunk", "split") if hkv == h else ("split",)
    fused = c.pick("fused", fused_forms) if layout == "fused_qkv" else None
    same_dv = layout == "fused_qkv" or kind == "v_transposed"
    dv = d if same_dv else c.pick("DV", (d, d) + tuple(x for x in head_dims if x != d)[:1])
    nq = c.set("NQ", d) if kind == "q_transposed" else c.integer("NQ", 1, max_seq)
    if layout in ("proj", "proj3d"):
        cross = c.pick("cross", (False, True))
    else:
        cross = layout != "fused_qkv"  # inputs layouts take k and v of their own length
    if kind in ("k_untransposed", "v_transposed"):
        nk = c.set("NK", dv if kind == "v_transposed" else d)
        if not cross:
            nq = c.set("NQ", nk)
    else:
        nk = c.integer("NK", 1, max_seq) if cross else c.set("NK", nq)
    if kind in ("q_transposed", "v_transposed"):
        c.pick("transpose", TRANSPOSES)
    elif kind == "k_untransposed":
        c.pick("transpose", K_UNTRANSPOSES)
    if layout in ("proj", "proj3d", "fused_qkv"):
        c.pick("sizes", ("constants", "minus_one", "shape"))
        c.pick("linear_bias", (False, True))
    if layout in ("proj", "proj3d") or fused == "split":
        c.pick("heads_split", ("view_transpose", "reshape_permute", "unflatten_transpose", "view_permute"))
    if layout == "inputs_bnhd":
        c.pick("heads_split", ("transpose", "permute"))
    if layout == "proj3d":
        c.pick("flatten_heads", ("reshape", "contiguous_view"))

    # GQA
    if three_d or hkv == h:
        gqa = c.set("gqa", "none")
    else:
        gqa = c.pick("gqa", ("repeat_kv", "repeat_interleave", "repeat_kv_inline", "unsqueeze_expand")
                     + (("broadcast",) if hkv == 1 else ()))

    # the q.kT product
    wrong_k = kind == "k_untransposed"
    matmul_only = kind in _TOKEN_EQUALS_FEATURE or gqa == "broadcast"
    if three_d:
        products = ("at", "bmm", "matmul", "bmm_method") + (() if matmul_only else ("einsum", "baddbmm",
                                                                                    "baddbmm_method"))
    else:
        products = ("at", "matmul", "matmul_method") + (() if matmul_only else ("einsum",))
    product = c.pick("product", products)
    pre_permuted_ok = (layout == "proj" or fused == "split") and not wrong_k
    if not wrong_k:
        if three_d:
            kts = ("transpose_m1m2", "transpose_12", "mT", "permute", "torch_transpose", "transpose_m2m1")
        else:
            kts = ("transpose_m1m2", "transpose_23", "mT", "permute", "torch_transpose", "transpose_m2m1",
                   "swapaxes") + (("pre_permuted",) if pre_permuted_ok else ())
        kt = c.pick("kT", kts)
        if product == "einsum":
            c.pick("einsum_form", ("dk",) if kt == "pre_permuted" else ("kd", "dk"))
    baddbmm = product.startswith("baddbmm")

    # scale (bf16: no softmax more peaked than with the usual D ** -0.5, see OPEN_BUGS)
    peaked_ok = not (kind == "attention" and c.values["dtype"] == "bfloat16" and "bf16_peaked_gradients" in avoid)
    placements = (["none"] if peaked_ok else []) + ["after", "on_q", "on_k", "on_kT", "both_quarter", "tensor"]
    if baddbmm:
        placements.append("alpha")
    scale = c.pick("scale", placements + ["after_bias", "after_mask"])  # the last two need a bias / mask
    if scale == "tensor":
        c.pick("scale_tensor", ("full", "tensor", "buffer", "param"))
        c.pick("scale_op", ("mul", "div") if peaked_ok else ("mul",))
    elif scale in ("after", "after_bias", "after_mask"):
        c.pick("scale_op", ("div", "mul", "rmul", "div_method", "mul_method", "idiv", "imul", "div_",
                            "torch_mul", "torch_div"))
    if scale in ("on_q", "on_k", "on_kT"):
        c.pick("scale_op", ("mul", "div"))
    if scale == "on_q" and layout in ("proj", "proj3d"):
        c.pick("scale_site", ("heads", "projection"))
    if scale != "none" and scale != "both_quarter":
        values = ("sqrt_d", 0.125, 0.3, 1.7) if scale != "tensor" else (0.125, 0.3, 1.7)
        if not peaked_ok:
            values = tuple(v for v in values if _scale_factor(v, c.values.get("scale_op", "mul"), d) <= d ** -0.5)
        c.pick("scale_value", values)

    # bias (baddbmm's input adds it before anything else: then no softcap and no tensor scale follow)
    patterns = PATTERNS_3D if three_d else PATTERNS_4D
    bias_kinds = ["none", "input", "param", "padding_min", "padding_inf"] + ([] if three_d else ["hf_long"])
    bias = c.pick("bias", bias_kinds)
    if kind == "bias_minus_scores" and bias == "none":
        bias = c.set("bias", "input")
    if bias in ("input", "param", "padding_min", "padding_inf"):
        c.pick("bias_shape", patterns)
    if baddbmm:
        bias_in = ("bias",) if bias != "none" and scale != "tensor" and kind not in ("tanh_no_mul",
                                                                                      "bias_minus_scores") else ()
        c.pick("baddbmm_input", ("empty", "zeros") + bias_in)
    in_baddbmm = baddbmm and c.values["baddbmm_input"] == "bias"

    # softcap
    softcap_ok = scale not in ("after_bias", "after_mask") and kind != "tanh_no_mul" and not in_baddbmm
    softcap = c.pick("softcap", ("none", "mul_tanh", "tanh_mul", "method", "lines") if softcap_ok else ("none",))
    if softcap != "none":
        c.pick("softcap_value", (20.0, 5.0, 50.0))
    if baddbmm:  # beta=0 ignores the input, even torch.empty's garbage
        c.pick("beta", (1.0, 0.5) if in_baddbmm else (0.0,))
    if bias != "none" and not in_baddbmm and kind != "bias_minus_scores":
        # no in-place op on tanh's output: autograd saved it. ("sub" of a padding bias adds +3.4e38: legal, if odd.)
        in_place = () if kind == "tanh_no_mul" else ("iadd",)
        c.pick("bias_add", ("plus", "radd", "torch_add", "add_method") + in_place + ("sub",))

    # masks
    masks = c.pick("masks", ("none", "padding", "causal", "padding+causal", "random", "random+causal"))
    if kind in ("small_fill", "mask_after_softmax") and masks == "none":
        masks = c.set("masks", "padding")
    parts = [] if masks == "none" else masks.split("+")
    if "padding" in parts:
        source = c.pick("padding_source", ("bool_input", "long_input"))
        if source == "long_input" and not three_d:
            c.pick("long_spelling", ("bool", "eq0"))
        if source == "bool_input":
            c.pick("padding_shape", patterns)
            c.pick("padding_polarity", ("keep", "hide"))
    if "random" in parts:
        c.pick("random_shape", patterns)
        c.pick("random_polarity", ("keep", "hide"))
    if "causal" in parts:
        c.pick("causal_source", ("buffer_bool", "buffer_float", "inline_tril", "inline_triu"))
    needs_pads = "padding" in parts or bias in ("padding_min", "padding_inf", "hf_long")
    if needs_pads:
        c.pick("pad_side", ("left", "right"))
        c.set("pads", tuple(draw(st.sampled_from(range(nk))) for _ in range(c.values["B"])))
    mask_applied = bool(parts) and kind != "mask_after_softmax"
    if mask_applied:
        if len(parts) == 2:
            c.pick("combine", ("separate", "combined"))
        applications = 2 if len(parts) == 2 and c.values["combine"] == "separate" else 1
        for i in range(applications):
            c.pick(f"fill_form{i}", ("masked_fill", "where_keep", "where_hide", "torch_masked_fill")
                   + (() if kind == "tanh_no_mul" else ("masked_fill_",)) + ("where_full", "where_tensor"))
        c.pick("negation", ("~", "logical_not", "torch_logical_not", "eq0"))
        if kind == "small_fill":
            c.pick("small_fill", SMALL_FILLS)
        else:
            fill = c.pick("fill", FILLS)
            if fill == "-inf":
                c.pick("inf_spelling", ("float", "math"))
            if bias != "none" and not in_baddbmm and fill == "-inf" and scale != "after_bias":
                c.pick("order", ("bias_first", "mask_first"))
    if scale == "after_bias" and (bias == "none" or in_baddbmm):
        c.set("scale", "after")
    if scale == "after_mask" and not mask_applied:
        c.set("scale", "after")
    if kind == "tanh_no_mul" and c.values["scale"] in ("after_bias", "after_mask"):
        c.set("scale", "after")

    # softmax, dropout, the p.v product, the output
    softmaxes = ("functional", "method", "torch", "module", "positive_dim", "dtype_to", "float_type_as",
                 "to_float_type", "special", "functional_positional")
    if kind not in ("log_softmax", "manual_softmax"):
        c.pick("softmax", softmaxes)
    c.pick("dropout", ("none", "module", "functional_false", "functional_training", "torch_dropout"))
    if kind == "weights_reused":
        c.pick("weights_use", ("sum", "mean", "amax"))
    if three_d:
        values = ("at", "bmm", "matmul") + (() if matmul_only else ("einsum",))
    else:
        values = ("at", "matmul") + (() if matmul_only else ("einsum",))
    c.pick("value_product", values)
    if layout in _PROJ:
        c.pick("output", ("merge_reshape", "merge_contiguous_view", "permute_flatten") if not three_d else ("merge",))
        o_proj = c.pick("o_proj", (False, True))
        if o_proj and not cross and kind not in _EXTRA_OUTPUT:
            c.pick("calls", (1, 2))
    else:
        c.pick("output", ("as_is", "merge") if three_d else ("as_is", "merge_reshape", "merge_contiguous_view",
                                                               "permute_flatten"))
    c.set("seed", draw(st.integers(0, 2**16)))
    return c.values


#: Open bugs the drawn programs can steer around, by name, so that a long run finds new ones: each gets a strict
#: xfail regression test in tests/test_fuzz.py and a condition on `name in avoid` in _choices; drop both once
#: it is fixed. The fixed ones keep their regression tests (tests/test_fuzz.py, "regressions").
OPEN_BUGS = {
    "bf16_peaked_gradients": "on peaked softmaxes (scores with std ~10) in bf16, gradients are several times further "
                             "from float64 than eager bf16's: the Triton backward's dq and dk (delta = rowsum(dO * O) "
                             "reads the bf16-rounded O, flash_bwd._bwd_preprocess), and on every backend the gradient "
                             "of a runtime 0-dim scale (it flows through q * t in bf16); steered around by keeping "
                             "bf16 attention at the usual scale or below",
}


def attention_programs(attention: Optional[bool] = None, dtypes=("float32", "float32", "float32", "bfloat16"),
                       max_batch: int = 2, max_heads: int = 4, max_seq: int = 12, head_dims=(8, 16, 24),
                       avoid=tuple(OPEN_BUGS)):
    """A Hypothesis strategy of random `Program`s.

    Args:
        attention: True draws only attention programs, False only near misses, None both (about half each).
        dtypes: dtype names to draw from (repeat one to draw it more often); the first is what shrinking
            goes to.
        max_batch, max_heads, max_seq: bounds of B, H and of Nq, Nk (each at least 1; near misses that
            need Nk == D go over max_seq).
        head_dims: head dims D (and Dv) to draw from.
        avoid: names of OPEN_BUGS whose programs are not drawn (default: all of them); () draws everything.
    """
    unknown = set(avoid) - set(OPEN_BUGS)
    if unknown:
        raise ValueError(f"unknown names in avoid: {sorted(unknown)}; known: {sorted(OPEN_BUGS)}")
    dtypes = tuple(str(d).replace("torch.", "") for d in dtypes)
    return _programs(attention, dtypes, max_batch, max_heads, max_seq, tuple(head_dims), frozenset(avoid))


# ---------------------------------------------------------------- writing the source

class _Source:
    def __init__(self):
        self.init, self.body, self.args, self.inputs, self.helpers = [], [], [], [], []

    def arg(self, name, tensor):
        self.args.append(name)
        self.inputs.append(tensor)

    def line(self, text):
        self.body.append(text)


_REPEAT_KV = '''
def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)
'''


def _float(x):
    return repr(float(x))


class _Builder:  # noqa: PLR0904  (one method per stage of the program)
    def __init__(self, c):
        self.c = c
        self.get = c.get
        self.kind = c["kind"]
        self.dtype = getattr(torch, c["dtype"])
        self.layout = c["layout"]
        self.three_d = self.layout in LAYOUTS_3D
        self.B, self.H, self.NQ, self.NK, self.D = c["B"], c["H"], c["NQ"], c["NK"], c["D"]
        self.HKV = c.get("HKV", self.H)
        self.DV = c.get("DV", self.D)
        self.src = _Source()
        self.gen = torch.Generator().manual_seed(c["seed"])
        self.hiding = []  # (hide bool (B, H, NQ, NK), fills with -inf)
        self.long_mask = None

    # -- data
    def randn(self, *shape, grad=True):
        t = torch.randn(*shape, generator=self.gen).to(self.dtype)
        return t.requires_grad_(grad)

    def full_shape(self):
        return (self.B * self.H, self.NQ, self.NK) if self.three_d else (self.B, self.H, self.NQ, self.NK)

    def pattern_shape(self, pattern):
        sizes = {"B": self.B, "H": self.H, "Q": self.NQ, "K": self.NK, "X": self.B * self.H, "1": 1}
        return tuple(sizes[ch] for ch in pattern)

    def reduce(self, full4, pattern):
        """A (B, H, NQ, NK) tensor cut down to a broadcast pattern (index 0 along the '1' dims)."""
        t = full4.reshape(self.full_shape())
        index = [0] * (t.dim() - len(pattern)) + [slice(0, 1) if ch == "1" else slice(None) for ch in pattern]
        return t[tuple(index)].contiguous()

    def expand4(self, t):
        return t.expand(self.full_shape()).reshape(self.B, self.H, self.NQ, self.NK)

    def pad_keep(self):
        """(B, NK) bool: the keys each batch's padding keeps."""
        keep = torch.ones(self.B, self.NK, dtype=torch.bool)
        for b, pad in enumerate(self.c["pads"]):
            if pad:
                if self.c["pad_side"] == "left":
                    keep[b, :pad] = False
                else:
                    keep[b, self.NK - pad:] = False
        return keep

    def pad_keep4(self):
        return self.pad_keep()[:, None, None, :].expand(self.B, self.H, self.NQ, self.NK)

    def causal_keep(self):
        diagonal = self.NK - self.NQ if self.NQ <= self.NK else 0
        return torch.ones(self.NQ, self.NK, dtype=torch.bool).tril(diagonal), diagonal

    def random_keep4(self):
        g = torch.Generator().manual_seed(self.c["seed"] + 1)
        keep = torch.rand(self.B, self.H, self.NQ, self.NK, generator=g) > 0.3
        keep[..., 0] = True
        return keep

    def long_attention_mask(self):
        if self.long_mask is None:
            self.long_mask = "attention_mask"
            self.src.arg("attention_mask", self.pad_keep().long())
        return self.long_mask

    # -- the pieces
    def build(self):
        self.sizes()
        self.qkv()
        self.gqa()
        self.operand_scales()
        self.product()
        self.scores_chain()
        self.softmax()
        self.after_softmax()
        self.value_product()
        self.output()
        return self.render()

    def sizes(self):
        c = self.c
        self.bq, self.nq_name, self.nk_name = "B", "NQ", "NK"
        if c.get("sizes") == "shape":
            self.bq, self.nq_name = "bsz", "q_len"
            self.nk_name = "kv_len" if self.get("cross") else "q_len"

    def heads(self, expr, n_name, heads, d, pre_permuted=False):
        """Split (B, N, heads * d) into heads: (B, heads, N, d), or (B, heads, d, N) when pre_permuted."""
        form = self.c.get("heads_split", "view_transpose")
        n = "-1" if self.c.get("sizes") == "minus_one" else n_name
        b = self.bq
        if pre_permuted:
            verb = "view" if form.startswith("view") else "reshape"
            return f"{expr}.{verb}({b}, {n}, {heads}, {d}).permute(0, 2, 3, 1)"
        if form == "view_transpose":
            return f"{expr}.view({b}, {n}, {heads}, {d}).transpose(1, 2)"
        if form == "reshape_permute":
            return f"{expr}.reshape({b}, {n}, {heads}, {d}).permute(0, 2, 1, 3)"
        if form == "view_permute":
            return f"{expr}.view({b}, {n}, {heads}, {d}).permute(0, 2, 1, 3)"
        return f"{expr}.unflatten(-1, ({heads}, {d})).transpose(1, 2)"

    def qkv(self):  # noqa: C901
        c, s, L = self.c, self.src, self.layout
        B, H, HKV, NQ, NK, D, DV = self.B, self.H, self.HKV, self.NQ, self.NK, self.D, self.DV
        pre = c.get("kT") == "pre_permuted"
        q_scale = ""
        if c["scale"] == "on_q" and c.get("scale_site") == "projection":
            q_scale = f" {self.scale_operator()} {self.scale_expr()}"
        if L == "inputs":
            s.arg("q", self.randn(B, H, NQ, D))
            s.arg("k", self.randn(B, HKV, NK, D))
            s.arg("v", self.randn(B, HKV, NK, DV))
        elif L == "inputs3d":
            s.arg("q", self.randn(B * H, NQ, D))
            s.arg("k", self.randn(B * H, NK, D))
            s.arg("v", self.randn(B * H, NK, DV))
        elif L == "inputs_bnhd":
            s.arg("q", self.randn(B, NQ, H, D))
            s.arg("k", self.randn(B, NK, HKV, D))
            s.arg("v", self.randn(B, NK, HKV, DV))
            if c["heads_split"] == "transpose":
                s.line("q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
            else:
                for name in "qkv":
                    s.line(f"{name} = {name}.permute(0, 2, 1, 3)")
        else:
            E = H * D
            self.E = E
            s.arg("x", self.randn(B, NQ, E))
            mem = "x"
            if c.get("cross"):
                mem = "memory"
                s.arg("memory", self.randn(B, NK, E))
            bias = c["linear_bias"]
            if c["sizes"] == "shape":
                s.line("bsz, q_len, _ = x.shape")
                if c.get("cross"):
                    s.line("kv_len = memory.shape[1]")
            if L == "fused_qkv":
                s.init.append(f"self.qkv = nn.Linear(E, (H + 2 * HKV) * D, bias={bias})")
                n = "-1" if c["sizes"] == "minus_one" else self.nq_name
                if c["fused"] == "unbind":
                    s.line(f"q, k, v = self.qkv(x).reshape({self.bq}, {n}, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)")
                elif c["fused"] == "index":
                    s.line(f"qkv = self.qkv(x).reshape({self.bq}, {n}, 3, H, D).permute(2, 0, 3, 1, 4)")
                    s.line("q, k, v = qkv[0], qkv[1], qkv[2]")
                elif c["fused"] == "chunk":
                    s.line(f"q, k, v = self.qkv(x).reshape({self.bq}, {n}, 3 * H, D).transpose(1, 2).chunk(3, dim=1)")
                else:
                    s.line("q, k, v = self.qkv(x).split([H * D, HKV * D, HKV * D], dim=-1)")
                    s.line(f"q = {self.heads('q', self.nq_name, 'H', 'D')}{q_scale}")
                    s.line(f"k = {self.heads('k', self.nk_name, 'HKV', 'D', pre)}")
                    s.line(f"v = {self.heads('v', self.nk_name, 'HKV', 'D')}")
                return
            s.init.append(f"self.q_proj = nn.Linear(E, H * D, bias={bias})")
            s.init.append(f"self.k_proj = nn.Linear(E, HKV * D, bias={bias})")
            s.init.append(f"self.v_proj = nn.Linear(E, HKV * DV, bias={bias})")
            qp = f"(self.q_proj(x){q_scale})" if q_scale else "self.q_proj(x)"
            if L == "proj":
                s.line(f"q = {self.heads(qp, self.nq_name, 'H', 'D')}")
                s.line(f"k = {self.heads(f'self.k_proj({mem})', self.nk_name, 'HKV', 'D', pre)}")
                s.line(f"v = {self.heads(f'self.v_proj({mem})', self.nk_name, 'HKV', 'DV')}")
            else:  # proj3d: BART's (B * H, N, D)
                b = self.bq
                for name, expr, n, d in (("q", qp, self.nq_name, "D"), ("k", f"self.k_proj({mem})", self.nk_name, "D"),
                                         ("v", f"self.v_proj({mem})", self.nk_name, "DV")):
                    split = self.heads(expr, n, "H", d)
                    if c["flatten_heads"] == "reshape":
                        s.line(f"{name} = {split}.reshape({b} * H, -1, {d})")
                    else:
                        s.line(f"{name} = {split}.contiguous().view({b} * H, -1, {d})")

    def gqa(self):
        c, s = self.c, self.src
        g = c["gqa"]
        if g in ("none", "broadcast"):
            return
        pre = c.get("kT") == "pre_permuted"
        for name in "kv":
            last2 = ("D", "NK") if (name == "k" and pre) else ("NK", "D" if name == "k" else "DV")
            if g == "repeat_kv":
                if _REPEAT_KV not in s.helpers:
                    s.helpers.append(_REPEAT_KV)
                s.line(f"{name} = repeat_kv({name}, H // HKV)")
            elif g == "repeat_interleave":
                s.line(f"{name} = {name}.repeat_interleave(H // HKV, dim=1)")
            elif g == "repeat_kv_inline":
                s.line(f"{name} = {name}[:, :, None, :, :].expand(B, HKV, H // HKV, {last2[0]}, {last2[1]})"
                       f".reshape(B, H, {last2[0]}, {last2[1]})")
            else:
                s.line(f"{name} = {name}.unsqueeze(2).expand(B, HKV, H // HKV, {last2[0]}, {last2[1]})"
                       f".reshape(B, H, {last2[0]}, {last2[1]})")

    # -- scale
    def scale_expr(self):
        value = self.c["scale_value"]
        op = self.c.get("scale_op", "mul")
        if value == "sqrt_d":
            return "math.sqrt(D)" if "div" in op else "D ** -0.5"
        return _float(value)

    def scale_operator(self):
        return "/" if "div" in self.c.get("scale_op", "mul") else "*"

    def operand_scales(self):
        c, s = self.c, self.src
        scale = c["scale"]
        if scale == "on_q" and c.get("scale_site") != "projection":
            s.line(f"q = q {self.scale_operator()} {self.scale_expr()}")
        elif scale == "on_k":
            s.line(f"k = k {self.scale_operator()} {self.scale_expr()}")
        elif scale == "both_quarter":
            s.line("q = q * D ** -0.25")
            s.line("k = k * D ** -0.25")

    def k_transposed(self):
        c = self.c
        if self.kind == "k_untransposed":
            form = c["transpose"]
            if form == "plain":
                return "k"
            if form == "double_transpose":
                return "k.mT.mT"
            return f"{self.transposed('k', form[:-3])}.mT"
        expr = {"transpose_m1m2": "k.transpose(-1, -2)", "transpose_m2m1": "k.transpose(-2, -1)",
                "transpose_12": "k.transpose(1, 2)", "transpose_23": "k.transpose(2, 3)", "mT": "k.mT",
                "permute": "k.permute(0, 2, 1)" if self.three_d else "k.permute(0, 1, 3, 2)",
                "torch_transpose": "torch.transpose(k, -2, -1)", "swapaxes": "k.swapaxes(-1, -2)",
                "pre_permuted": "k"}[c["kT"]]
        if c["scale"] == "on_kT":
            expr = f"({expr} {self.scale_operator()} {self.scale_expr()})"
        return expr

    def transposed(self, var, form):
        """var with its last two dims swapped, spelled `form` (one of TRANSPOSES)."""
        sub = "b" if self.three_d else "bh"
        return {"mT": f"{var}.mT", "transpose": f"{var}.transpose(-1, -2)", "movedim": f"{var}.movedim(-1, -2)",
                "moveaxis": f"torch.moveaxis({var}, -1, -2)",
                "einsum": f'torch.einsum("{sub}nd->{sub}dn", {var})'}[form]

    def product(self):
        c, s = self.c, self.src
        p = c["product"]
        kt = self.k_transposed()
        if self.kind == "q_transposed":
            s.line(f"q = {self.transposed('q', c['transpose'])}")
        if p == "einsum":
            sub = "b" if self.three_d else "bh"
            if c["einsum_form"] == "kd":
                k = "k" if c["scale"] != "on_kT" else f"(k {self.scale_operator()} {self.scale_expr()})"
                s.line(f'scores = torch.einsum("{sub}qd,{sub}kd->{sub}qk", q, {k})')
            else:
                s.line(f'scores = torch.einsum("{sub}qd,{sub}dk->{sub}qk", q, {kt})')
        elif p == "at":
            s.line(f"scores = q @ {kt}")
        elif p == "matmul":
            s.line(f"scores = torch.matmul(q, {kt})")
        elif p == "matmul_method":
            s.line(f"scores = q.matmul({kt})")
        elif p == "bmm":
            s.line(f"scores = torch.bmm(q, {kt})")
        elif p == "bmm_method":
            s.line(f"scores = q.bmm({kt})")
        else:
            src = c["baddbmm_input"]
            if src == "bias":
                inp = self.bias_tensor()
            else:
                fn = "torch.empty" if src == "empty" else "torch.zeros"
                s.line(f"base = {fn}(B * H, NQ, NK, dtype=q.dtype, device=q.device)")
                inp = "base"
            alpha = self.scale_expr() if c["scale"] == "alpha" else "1.0"
            beta = _float(c["beta"])
            if p == "baddbmm":
                s.line(f"scores = torch.baddbmm({inp}, q, {kt}, beta={beta}, alpha={alpha})")
            else:
                s.line(f"scores = {inp}.baddbmm(q, {kt}, beta={beta}, alpha={alpha})")

    def scale_after(self):
        c, s = self.c, self.src
        op, value = c["scale_op"], self.scale_expr()
        line = {"div": f"scores = scores / {value}", "mul": f"scores = scores * {value}",
                "rmul": f"scores = {value} * scores", "div_method": f"scores = scores.div({value})",
                "mul_method": f"scores = scores.mul({value})", "idiv": f"scores /= {value}",
                "imul": f"scores *= {value}", "div_": f"scores.div_({value})",
                "torch_mul": f"scores = torch.mul(scores, {value})",
                "torch_div": f"scores = torch.div(scores, {value})"}[op]
        s.line(line)

    def scale_tensor(self):
        c, s = self.c, self.src
        value = _float(c["scale_value"])
        form = c["scale_tensor"]
        if form == "full":
            t = f"torch.full([], {value})"
        elif form == "tensor":
            t = f"torch.tensor({value})"
        elif form == "buffer":
            s.init.append(f'self.register_buffer("temperature", torch.tensor({value}))')
            t = "self.temperature"
        else:
            s.init.append(f"self.temperature = nn.Parameter(torch.tensor({value}))")
            t = "self.temperature"
        s.line(f"scores = scores {'*' if c['scale_op'] == 'mul' else '/'} {t}")

    def softcap(self):
        c, s = self.c, self.src
        form = c["softcap"]
        if form == "none":
            return
        cap = _float(c["softcap_value"])
        if form == "mul_tanh":
            s.line(f"scores = {cap} * torch.tanh(scores / {cap})")
        elif form == "tanh_mul":
            s.line(f"scores = torch.tanh(scores / {cap}) * {cap}")
        elif form == "method":
            s.line(f"scores = scores.div({cap}).tanh().mul({cap})")
        else:
            s.line(f"scores = scores / {cap}")
            s.line("scores = torch.tanh(scores)")
            s.line(f"scores = scores * {cap}")

    # -- bias
    def bias_tensor(self):
        """The bias as an expression (adding its input or parameter); records what it hides."""
        c, s = self.c, self.src
        kind = c["bias"]
        if kind == "hf_long":
            mask = self.long_attention_mask()
            s.line(f"bias = (1.0 - {mask}[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min")
            self.hiding.append((~self.pad_keep4(), False))
            return "bias"
        shape = self.pattern_shape(c["bias_shape"])
        if kind == "input":
            s.arg("bias", self.randn(*shape))
            return "bias"
        if kind == "param":
            s.init.append(f"self.rel_bias = nn.Parameter(torch.randn{shape} * 0.5)")
            return "self.rel_bias"
        keep4 = self.pad_keep4()
        fill = torch.finfo(self.dtype).min if kind == "padding_min" else float("-inf")
        full = torch.zeros(self.B, self.H, self.NQ, self.NK).masked_fill(~keep4, fill)
        data = self.reduce(full, c["bias_shape"]).to(self.dtype)
        s.arg("bias", data)
        hidden = self.expand4(self.reduce(~keep4, c["bias_shape"]))
        self.hiding.append((hidden, kind == "padding_inf"))
        return "bias"

    def add_bias(self):
        c, s = self.c, self.src
        b = self.bias_tensor()
        if self.kind == "bias_minus_scores":
            s.line(f"scores = {b} - scores")
            return
        line = {"plus": f"scores = scores + {b}", "radd": f"scores = {b} + scores",
                "torch_add": f"scores = torch.add(scores, {b})", "add_method": f"scores = scores.add({b})",
                "iadd": f"scores += {b}", "sub": f"scores = scores - {b}"}[c["bias_add"]]
        s.line(line)

    # -- masks
    def fill_expr(self):
        c = self.c
        if self.kind == "small_fill":
            return _float(c["small_fill"])
        fill = c["fill"]
        if fill == "-inf":
            return 'float("-inf")' if c["inf_spelling"] == "float" else "-math.inf"
        return {"finfo_min": "torch.finfo(scores.dtype).min", "-1e4": "-10000.0", "-1e9": "-1e9"}[fill]

    def negate(self, var):
        form = self.c.get("negation", "~")
        return {"~": f"~{var}", "logical_not": f"{var}.logical_not()", "torch_logical_not": f"torch.logical_not({var})",
                "eq0": f"({var} == 0)"}[form]

    def mask_vars(self):
        """Emit the mask tensors; return [(variable, polarity "keep" | "hide", hide (B, H, NQ, NK))]."""
        c, s = self.c, self.src
        parts = [] if c["masks"] == "none" else c["masks"].split("+")
        out = []
        if "padding" in parts:
            keep4 = self.pad_keep4()
            if c["padding_source"] == "bool_input":
                pattern, polarity = c["padding_shape"], c["padding_polarity"]
                reduced = self.reduce(keep4, pattern)
                name = "keep" if polarity == "keep" else "pad"
                s.arg(name, reduced if polarity == "keep" else ~reduced)
                out.append((name, polarity, ~self.expand4(reduced)))
            else:
                mask = self.long_attention_mask()
                if self.three_d:
                    s.line(f"keep = {mask}[:, None, None, :].expand(B, H, 1, NK).reshape(B * H, 1, NK).bool()")
                    out.append(("keep", "keep", ~keep4))
                elif c["long_spelling"] == "eq0":
                    s.line(f"pad = {mask}[:, None, None, :] == 0")
                    out.append(("pad", "hide", ~keep4))
                else:
                    s.line(f"keep = {mask}[:, None, None, :].bool()")
                    out.append(("keep", "keep", ~keep4))
        if "random" in parts:
            keep4 = self.random_keep4()
            pattern, polarity = c["random_shape"], c["random_polarity"]
            reduced = self.reduce(keep4, pattern)
            name = "allowed" if polarity == "keep" else "blocked"
            s.arg(name, reduced if polarity == "keep" else ~reduced)
            out.append((name, polarity, ~self.expand4(reduced)))
        if "causal" in parts:
            keep2, diagonal = self.causal_keep()
            hide4 = ~keep2.expand(self.B, self.H, self.NQ, self.NK)
            src = c["causal_source"]
            rows = f"{diagonal}:{diagonal + self.NQ}" if diagonal else ":NQ"
            lead = "" if self.three_d else ":, :, "
            if src in ("buffer_bool", "buffer_float"):
                m = max(self.NQ, self.NK) + 3
                view = "" if self.three_d else f".view(1, 1, {m}, {m})"
                dtype = "dtype=torch.bool" if src == "buffer_bool" else "dtype=torch.float32"
                s.init.append(f'self.register_buffer("tril", torch.tril(torch.ones({m}, {m}, {dtype})){view}, '
                              "persistent=False)")
                if src == "buffer_bool":
                    s.line(f"causal = self.tril[{lead}{rows}, :NK]")
                    out.append(("causal", "keep", hide4))
                else:
                    s.line(f"future = self.tril[{lead}{rows}, :NK] == 0")
                    out.append(("future", "hide", hide4))
            elif src == "inline_tril":
                s.line(f"causal = torch.ones(NQ, NK, dtype=torch.bool, device=q.device).tril({diagonal})")
                out.append(("causal", "keep", hide4))
            else:
                s.line(f"future = torch.ones(NQ, NK, dtype=torch.bool, device=q.device).triu({diagonal + 1})")
                out.append(("future", "hide", hide4))
        return out

    def keep_expr(self, var, polarity):
        return var if polarity == "keep" else self.negate(var)

    def hide_expr(self, var, polarity):
        return var if polarity == "hide" else self.negate(var)

    def apply_masks(self, masks):
        c, s = self.c, self.src
        if len(masks) == 2 and c["combine"] == "combined":
            (a, pa, ha), (b, pb, hb) = masks
            if pa == pb == "hide":
                s.line(f"hidden = {a} | {b}")
                masks = [("hidden", "hide", ha | hb)]
            else:
                s.line(f"visible = {self.keep_expr(a, pa)} & {self.keep_expr(b, pb)}")
                masks = [("visible", "keep", ha | hb)]
        fill = self.fill_expr()
        inf = self.kind != "small_fill" and c["fill"] == "-inf"
        for i, (var, polarity, hide) in enumerate(masks):
            if self.kind != "small_fill":
                self.hiding.append((hide, inf))
            form = c[f"fill_form{i}"]
            if form == "masked_fill":
                s.line(f"scores = scores.masked_fill({self.hide_expr(var, polarity)}, {fill})")
            elif form == "torch_masked_fill":
                s.line(f"scores = torch.masked_fill(scores, {self.hide_expr(var, polarity)}, {fill})")
            elif form == "masked_fill_":
                s.line(f"scores.masked_fill_({self.hide_expr(var, polarity)}, {fill})")
            elif form == "where_keep":
                s.line(f"scores = torch.where({self.keep_expr(var, polarity)}, scores, {fill})")
            elif form == "where_hide":
                s.line(f"scores = torch.where({self.hide_expr(var, polarity)}, {fill}, scores)")
            elif form == "where_full":
                s.line(f"fill = torch.full([], {fill}, dtype=scores.dtype, device=scores.device)")
                s.line(f"scores = torch.where({self.keep_expr(var, polarity)}, scores, fill)")
            else:
                s.line(f"scores = torch.where({self.keep_expr(var, polarity)}, scores, "
                       f"torch.tensor({fill}, dtype=scores.dtype))")

    def scores_chain(self):
        c, s = self.c, self.src
        scale = c["scale"]
        if self.kind == "per_key_scale":
            s.init.append("self.key_scale = nn.Parameter(torch.rand(NK) + 0.5)")
            s.line("scores = scores * self.key_scale")
        if scale == "after":
            self.scale_after()
        elif scale == "tensor":
            self.scale_tensor()
        self.softcap()
        if self.kind == "tanh_no_mul":
            s.line("scores = torch.tanh(scores)")
        has_bias = c["bias"] != "none" and c.get("baddbmm_input") != "bias"
        masks = self.mask_vars() if c["masks"] != "none" else []
        apply = bool(masks) and self.kind != "mask_after_softmax"
        self.after_masks = masks if not apply else []
        if c.get("order") == "mask_first":
            if apply:
                self.apply_masks(masks)
            if has_bias:
                self.add_bias()
        else:
            if has_bias:
                self.add_bias()
            if scale == "after_bias":
                self.scale_after()
            if apply:
                self.apply_masks(masks)
        if scale == "after_mask":
            self.scale_after()

    # -- softmax and after
    def softmax(self):
        c, s = self.c, self.src
        if self.kind == "scores_reused":
            s.line("peak = scores.amax()")
        if self.kind == "log_softmax":
            s.line("weights = F.log_softmax(scores, dim=-1)")
            return
        if self.kind == "manual_softmax":
            s.line("e = (scores - scores.amax(dim=-1, keepdim=True)).exp()")
            s.line("weights = e / e.sum(dim=-1, keepdim=True)")
            return
        dim = "-2" if self.kind == "softmax_dim" else "-1"
        rank = 3 if self.three_d else 4
        pos = str(int(dim) + rank)
        form = c["softmax"]
        if form == "module":
            s.init.append(f"self.softmax = nn.Softmax(dim={dim})")
        line = {"functional": f"F.softmax(scores, dim={dim})", "method": f"scores.softmax({dim})",
                "torch": f"torch.softmax(scores, dim={dim})", "module": "self.softmax(scores)",
                "positive_dim": f"torch.softmax(scores, dim={pos})",
                "dtype_to": f"F.softmax(scores, dim={dim}, dtype=torch.float32).to(q.dtype)",
                "float_type_as": f"scores.float().softmax(dim={dim}).type_as(scores)",
                "to_float_type": f"F.softmax(scores.to(torch.float32), dim={dim}).type(q.dtype)",
                "special": f"torch.special.softmax(scores, {dim})",
                "functional_positional": f"F.softmax(scores, {dim})"}[form]
        s.line(f"weights = {line}")

    def after_softmax(self):
        c, s = self.c, self.src
        form = c["dropout"]
        if form == "module":
            s.init.append("self.attn_dropout = nn.Dropout(0.1)")
            s.line("weights = self.attn_dropout(weights)")
        elif form == "functional_false":
            s.line("weights = F.dropout(weights, p=0.1, training=False)")
        elif form == "functional_training":
            s.line("weights = F.dropout(weights, p=0.2, training=self.training)")
        elif form == "torch_dropout":
            s.line("weights = torch.dropout(weights, 0.1, False)")
        if self.kind == "mask_after_softmax":
            var, polarity, _ = self.after_masks[0]
            s.line(f"weights = weights.masked_fill({self.hide_expr(var, polarity)}, 0.0)")

    def value_product(self):
        c, s = self.c, self.src
        v = self.transposed("v", c["transpose"]) if self.kind == "v_transposed" else "v"
        form = c["value_product"]
        sub = "b" if self.three_d else "bh"
        line = {"at": f"weights @ {v}", "matmul": f"torch.matmul(weights, {v})", "bmm": f"torch.bmm(weights, {v})",
                "einsum": f'torch.einsum("{sub}qk,{sub}kd->{sub}qd", weights, {v})'}[form]
        s.line(f"out = {line}")
        if self.kind == "weights_reused":
            s.line(f"out = out + weights.{c['weights_use']}(dim=-1, keepdim=True)")

    def output(self):
        c, s = self.c, self.src
        dv = "NK" if self.kind == "v_transposed" else "DV"
        form = c["output"]
        b, nq = self.bq, self.nq_name
        if form == "merge_reshape":
            s.line(f"out = out.transpose(1, 2).reshape({b}, {nq}, H * {dv})")
        elif form == "merge_contiguous_view":
            s.line(f"out = out.transpose(1, 2).contiguous().view({b}, {nq}, -1)")
        elif form == "permute_flatten":
            s.line("out = out.permute(0, 2, 1, 3).flatten(2)")
        elif form == "merge":
            s.line(f"out = out.view({b}, H, {nq}, {dv}).transpose(1, 2).reshape({b}, {nq}, H * {dv})")
        if c.get("o_proj"):
            s.init.append(f"self.o_proj = nn.Linear(H * {dv}, E)")
            s.line("out = self.o_proj(out)")

    # -- the whole source
    def render(self):
        c, s = self.c, self.src
        consts = ["B", "H", "HKV", "NQ", "NK", "D", "DV"]
        values = [self.B, self.H, self.HKV, self.NQ, self.NK, self.D, self.DV]
        header = ["import math", "", "import torch", "import torch.nn as nn", "import torch.nn.functional as F", "",
                  f"{', '.join(consts)} = {', '.join(map(str, values))}"]
        if self.layout in _PROJ:
            header.append("E = H * D")
        lines = header + ["", ""]
        for helper in s.helpers:
            lines += [helper.strip("\n"), "", ""]
        lines.append("class Program(nn.Module):")
        if s.init:
            lines += ["    def __init__(self):", "        super().__init__()"]
            lines += [f"        {x}" for x in s.init]
            lines.append("")
        returns = "out"
        if self.kind == "weights_returned":
            returns = "out, weights"
        elif self.kind == "scores_reused":
            returns = "out, peak"
        calls = c.get("calls", 1)
        first, rest = s.args[0], s.args[1:]
        if calls == 2:
            lines.append(f"    def forward(self, {', '.join(s.args)}):")
            extra = "".join(f", {a}" for a in rest)
            lines.append(f"        return self.attend(self.attend({first}{extra}){extra})")
            lines.append("")
            lines.append(f"    def attend(self, {', '.join(s.args)}):")
        else:
            lines.append(f"    def forward(self, {', '.join(s.args)}):")
        lines += [f"        {x}" for x in s.body]
        lines.append(f"        return {returns}")
        return "\n".join(lines) + "\n"


def _rows_all(hide):
    return bool(hide.all(dim=-1).any()) if hide.numel() else False


def _fully_masked(builder):
    """Some query row sees no key: every key is hidden (by a mask, or a padding bias)."""
    every = torch.zeros(builder.B, builder.H, builder.NQ, builder.NK, dtype=torch.bool)
    for hide, _ in builder.hiding:
        every |= hide
    return _rows_all(every)


_COUNTER = [0]


class NaNProgram(ValueError):
    """The choices make a program whose eager output has NaN (a row with every key at -inf)."""


def _repairs(choices):
    """The choices, then the same with left padding made right padding, then with no padding."""
    yield choices
    if choices.get("pad_side") == "left":
        choices = dict(choices, pad_side="right")
        yield choices
    if any(choices.get("pads", ())):
        yield dict(choices, pads=(0,) * len(choices["pads"]))


def _has_nan(module, inputs):
    with torch.no_grad():
        out = module(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    return any(torch.isnan(o).any() for o in outs if o.is_floating_point())


def _instantiate(choices):
    builder = _Builder(choices)
    source = builder.build()
    _COUNTER[0] += 1
    filename = f"<flashfuse-program-{_COUNTER[0]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "flashfuse_program"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102  (the program is the source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(choices["seed"])
        module = namespace["Program"]().to(getattr(torch, choices["dtype"])).eval()
    return builder, source, module


def build_program(choices: dict) -> Program:
    """Write, exec and instantiate the program a dict of choices describes (as drawn by attention_programs).

    A row that every key hides with -inf gives NaN in eager code too (so does finfo.min scaled past the
    dtype's range), and a NaN output proves nothing. When eager gives NaN, left padding becomes right
    padding (which never hides key 0; causal and random masks keep it), then no padding; the program's
    `choices` are the repaired ones. Raises NaNProgram if none of them helps.
    """
    for choices in _repairs(dict(choices)):
        builder, source, module = _instantiate(choices)
        inputs = tuple(builder.src.inputs)
        if not _has_nan(module, inputs):
            break
    else:
        raise NaNProgram("eager gives NaN for these choices, with and without padding")
    kind = choices["kind"]
    sites = choices.get("calls", 1) if kind == "attention" else 0
    return Program(source, module, inputs, kind == "attention", sites, choices,
                   fully_masked_rows=_fully_masked(builder))


@st.composite
def _programs(draw, *args):
    try:
        return build_program(draw(_choices(*args)))
    except NaNProgram:
        assume(False)


# ---------------------------------------------------------------- checking a program

def interpreter_active():
    """True when CPU tensors run the Triton kernels through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_program(program: Program, options=None, grad=None):
    """Compile a drawn program with flashfuse and check it: rewritten sites, outputs and gradients.

    Runs `assert_equivalent` (count of rewritten sites == program.expected_sites; outputs and gradients
    within the dtype's tolerance of eager). A program that misses only the tolerances is judged again
    against a float64 run of the same program (`judge_against_oracle`): bf16 eager is often further from
    the exact result than the fused op, and an exactly-zero gradient (one key per row) is exact in eager
    but rounding noise in any other algorithm.

    `options` defaults to `fuzz_options()` (AOTAutograd without inductor unless $FLASHFUSE_FUZZ_COMPILER
    says otherwise). `grad=None` compares gradients except where a known gap says not to (`skip_gradients`).
    Returns the Sites found.
    """
    from flashfuse.testing.equivalence import assert_equivalent
    from flashfuse.testing.profiles import fuzz_options
    options = fuzz_options() if options is None else options
    if grad is None:
        grad = not skip_gradients(program)
    seed = program.choices.get("seed", 0)
    try:
        return assert_equivalent(program.module, *program.inputs, expected_sites=program.expected_sites, grad=grad,
                                 options=options, source=program.source, seed=seed)
    except AssertionError as failure:
        message = str(failure).split("\n", 1)[0]
        if "sites rewritten" in message or "outputs, expected" in message or "differs" in message:
            raise
        verdict = judge_against_oracle(program, options, grad)
        if verdict is not None:
            raise AssertionError(f"{verdict}\n(against eager: {failure})") from None
        return None


#: How much further from the float64 result than allowed (see judge_against_oracle) the compiled program may be.
ORACLE_SLACK = 2.0
#: The rounding floor of judge_against_oracle, relative to the norm of all gradients: bf16's eps, and for float32
#: 1e-5 (its gradient tolerance times tolerances.gradients_error's floor of 1e-2): with one key per row, a flash
#: backward's dS = P * (dP - rowsum(dO * O)) cancels to rounding noise of a few 1e-6 of the gradients' scale,
#: where eager's softmax backward gives exactly 0.
ROUNDING_FLOOR = {torch.float32: 1e-5, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
                  torch.float16: torch.finfo(torch.float16).eps}


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return []


def _run(module, inputs, cotangent_seed):
    outs = [o for o in _flat(module(*inputs)) if o.is_floating_point()]
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad] + \
        [p for p in module.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    wanted = [(o, ct) for o, ct in zip(outs, cotangents) if o.requires_grad]
    grads = torch.autograd.grad([o for o, _ in wanted], leaves, [ct for _, ct in wanted], allow_unused=True) \
        if wanted and leaves else []
    return outs, list(grads)


def judge_against_oracle(program: Program, options=None, grad=True):
    """None when the compiled program is about as close to a float64 run as eager is; else what is wrong.

    Each output and gradient tensor c of the compiled program, e of eager and o of float64 must satisfy

        ||c - o|| <= ORACLE_SLACK * max(tol * ||o||, ||e - o||, eps * total)

    tol: the dtype's tolerance (tolerances.FORWARD / GRADIENT; for gradients ||o|| is floored at 1e-2 x
    total, as gradients_error does); ||e - o||: eager's own error; eps * total: rounding at the scale of
    all gradients together (total: their float64 norm; for outputs, ||o||), the most a gradient that is
    zero in exact arithmetic can be trusted to; eps is ROUNDING_FLOOR[dtype].
    """
    from flashfuse.testing.equivalence import compile_and_report
    from flashfuse.testing.profiles import fuzz_options
    from flashfuse.tolerances import FORWARD, GRADIENT
    options = fuzz_options() if options is None else options
    seed = program.choices.get("seed", 0)
    dtype = getattr(torch, program.choices.get("dtype", "float32"))
    eps = ROUNDING_FLOOR.get(dtype, torch.finfo(dtype).eps)
    oracle = copy.deepcopy(program.module).double()
    oracle_inputs = tuple(x.detach().double().requires_grad_(x.requires_grad)
                          if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in program.inputs)
    torch.manual_seed(seed)
    o_out, o_grad = _run(oracle, oracle_inputs, seed)
    torch.manual_seed(seed)
    e_out, e_grad = _run(program.module, program.inputs, seed)
    compiled, _ = compile_and_report(program.module, options)
    torch.manual_seed(seed)
    c_out, c_grad = _run(compiled, program.inputs, seed)

    def norm(t):
        return t.detach().double().norm().item() if t is not None else 0.0

    def error(a, b):
        if a is None or b is None:
            return 0.0 if a is None and b is None else float("inf")
        a, b = a.detach().double(), b.detach().double()
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return float("inf")
        keep = ~torch.isnan(b)
        return (a[keep] - b[keep]).norm().item()

    if any(error(e, o) == float("inf") for e, o in zip(e_out + e_grad, o_out + o_grad)):
        return "the float64 run has NaN where eager has none (dtype-dependent constants?); no verdict against it"
    problems = []
    for i, (c, e, o) in enumerate(zip(c_out, e_out, o_out)):
        allowed = ORACLE_SLACK * max(FORWARD[dtype] * norm(o), error(e, o), eps * norm(o))
        if not error(c, o) <= allowed:
            problems.append(f"output {i}: error against float64 {error(c, o):.3g} > {allowed:.3g} allowed "
                            f"(eager's {error(e, o):.3g}, norm {norm(o):.3g})")
    if grad and o_grad:
        total = sum(norm(o) ** 2 for o in o_grad) ** 0.5
        for i, (c, e, o) in enumerate(zip(c_grad, e_grad, o_grad)):
            scale = max(norm(o), 1e-2 * total)
            allowed = ORACLE_SLACK * max(GRADIENT[dtype] * scale, error(e, o), eps * total)
            if not error(c, o) <= allowed:
                problems.append(f"gradient {i}: error against float64 {error(c, o):.3g} > {allowed:.3g} allowed "
                                f"(eager's {error(e, o):.3g}, norm {norm(o):.3g}, all gradients {total:.3g})")
    return "; ".join(problems) or None


#: Known kernel gaps whose gradients check_program leaves unchecked, by name. The one it was written for
#: ("fully_masked_rows_interpreter_grad": under TRITON_INTERPRET=1, rows whose every key is hidden by a huge
#: finite fill) no longer shows (docs/fuzzing.md), so none is skipped; put the name back to skip it again.
KNOWN_GAPS = {}


def skip_gradients(program: Program) -> bool:
    """True for programs in a known gap (KNOWN_GAPS) whose gradients check_program leaves unchecked."""
    if os.environ.get("FLASHFUSE_FUZZ_STRICT") == "1":
        return False
    return ("fully_masked_rows_interpreter_grad" in KNOWN_GAPS and program.fully_masked_rows
            and program.is_attention and interpreter_active())
