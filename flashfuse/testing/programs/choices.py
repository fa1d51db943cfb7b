"""What a random attention program is made of: the named choices, drawn by `draw_choices`, and their options.

Every choice is drawn with `sampled_from` (sizes too: uniform, where `integers` favours the ends), simplest
option first, so that Hypothesis shrinks a failure to a short program. The writer (writer.py) turns the
choices into source text.
"""
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


def _divisors_desc(n):
    return [d for d in range(n, 0, -1) if n % d == 0]


@st.composite
def draw_choices(draw, attention, dtypes, max_batch, max_heads, max_seq, head_dims, avoid):  # noqa: C901
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
    # rotary embeddings on q's and k's feature pairs: complex numbers (Llama 4, Meta's code) or stacked pairs
    if not three_d and c.values.get("kT") != "pre_permuted" and d % 2 == 0:
        c.pick("rope", ("none", "none", "complex", "pairs"))

    # scale
    placements = ["none", "after", "on_q", "on_k", "on_kT", "both_quarter", "tensor"]
    if baddbmm:
        placements.append("alpha")
    scale = c.pick("scale", placements + ["after_bias", "after_mask"])  # the last two need a bias / mask
    if scale == "tensor":
        c.pick("scale_tensor", ("full", "tensor", "buffer", "param"))
        c.pick("scale_op", ("mul", "div"))
    elif scale in ("after", "after_bias", "after_mask"):
        c.pick("scale_op", ("div", "mul", "rmul", "div_method", "mul_method", "idiv", "imul", "div_",
                            "torch_mul", "torch_div"))
    if scale in ("on_q", "on_k", "on_kT"):
        c.pick("scale_op", ("mul", "div"))
    if scale == "on_q" and layout in ("proj", "proj3d"):
        c.pick("scale_site", ("heads", "projection"))
    if scale != "none" and scale != "both_quarter":
        c.pick("scale_value", ("sqrt_d", 0.125, 0.3, 1.7) if scale != "tensor" else (0.125, 0.3, 1.7))

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
        c.pick("causal_source", ("buffer_bool", "buffer_float", "inline_tril", "inline_triu", "positions", "distance"))
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
            # a bias after a finite fill: the op's bias_last, for a bias that takes no gradient, after one mask,
            # with nothing between it and the softmax (match._take_stacked)
            stacked_ok = (kind == "attention" and applications == 1 and scale != "after_mask"
                          and bias in ("padding_min", "padding_inf", "hf_long"))
            if bias != "none" and not in_baddbmm and (fill == "-inf" or stacked_ok) and scale != "after_bias":
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
