"""Padded batches at causal speed: the masks transformers builds (causal or sliding window, and-ed with the
padding, filled with finfo.min) reach the op as flags plus a (B, 1, 1, Nk) key mask, never as an N x N tensor;
outputs, gradients and generation equal eager's, fully hidden (padded) query rows included.
Also the masks that must stay tensors: structure the matcher cannot prove is left alone, with the reason."""
import pytest
import torch

import flashfuse
from flashfuse.testing import assert_equivalent, models
from flashfuse.tolerances import FORWARD, GRADIENT, gradients_error, relative_error

# family -> (causal, the windows its sites may have): the tiny configs' sliding_window=5 is (4, -1); gpt-oss
# alternates sliding and full layers and adds an attention sink to every site; BERT's bidirectional mask is
# `q >= 0` (always true) and the padding; ModernBERT's local layer keeps |q - kv| <= 2
MASKS = {"gpt2": (True, {(-1, -1)}), "llama": (True, {(-1, -1)}), "mistral": (True, {(4, -1)}),
         "gpt_oss_sinks": (True, {(4, -1), (-1, -1)}), "bert": (False, {(-1, -1)}),
         "modernbert_local": (False, {(-1, -1), (2, 2)})}
OP = ("flashfuse::fwd", "flashfuse::opaque_fwd")


def _run(model, inputs):
    out = models.first_output(model(**inputs))
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out, params, cotangent, allow_unused=True)


def _op_input_shapes(fn):
    """The input shapes of every call of the op that fn() makes, from the profiler."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return [e.input_shapes for e in prof.events() if e.name in OP]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", list(MASKS))
def test_padded_batch_is_structure_plus_key_padding(family, side):
    model, inputs = models.build(family, padding=side, seq=24)  # longer than the head dim (16)
    n = inputs["input_ids"].shape[1]
    sites = [s for s in flashfuse.explain(model, **inputs).sites if s.attention]  # gpt-oss: routers apart
    assert len(sites) == 2 and all(s.rewritten for s in sites)
    assert all(s.operands["sink"] == (family == "gpt_oss_sinks") for s in sites)
    for site in sites:
        causal, windows = MASKS[family]
        assert site.spec.causal == causal and site.spec.window in windows
        assert site.operands["mask_note"] == "key_padding" and "key_padding" in site.describe()
    expected, expected_grads = _run(model, inputs)  # the loss covers the padded positions too
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="flashfuse")
    _run(compiled, inputs)
    shapes = _op_input_shapes(lambda: _run(compiled, inputs))
    assert len(shapes) == 2
    for call in shapes:
        big = [s for s in call if len(s) >= 2 and s[-1] >= n and s[-2] >= n]
        assert not big, f"an N x N tensor reached the op: {big}"
        assert [1, 1, n] in [s[1:] for s in call if len(s) == 4], "the key mask (B, 1, 1, Nk)"
    actual, actual_grads = _run(compiled, inputs)
    assert relative_error(actual, expected) < FORWARD[torch.float32]
    assert gradients_error(actual_grads, expected_grads) < GRADIENT[torch.float32]


SDPA_MASKS = {"llama": (True, (-1, -1)), "mistral": (True, (4, -1)), "modernbert_local": (False, None),
              "bert": (False, (-1, -1))}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", list(SDPA_MASKS))
def test_sdpa_models_padded_batch_is_structure_plus_key_padding(family, side):
    """transformers' default attention, "sdpa", hands F.scaled_dot_product_attention the same masks as a bool
    attn_mask: the SDPA site gets the structure and the key padding too, with SDPA's zeros for a query that sees no
    key; outputs and gradients equal eager's."""
    model, inputs = models.build(family, padding=side, attn="sdpa")
    sites = assert_equivalent(models.Positional(model, inputs), *inputs.values(), options={"compiler": "eager"})
    causal, window = SDPA_MASKS[family]
    assert sites and all(s.kind == "sdpa" and s.spec.causal == causal for s in sites)
    assert all(s.operands["mask_note"] == "key_padding" and s.spec.empty_rows == "zero" for s in sites)
    assert {s.spec.window for s in sites} == ({(-1, -1), (2, 2)} if window is None else {window})


# -- the spellings: q (B, H, N, D); a (B, N) padding vector; masks built in the graph as transformers does ------

B, H, N, D = 2, 2, 10, 8
FAST = {"compiler": "eager"}


def _qkv():
    """q, k, v leaves: assert_equivalent compares the gradients of the inputs that require them."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, N, D, generator=gen).requires_grad_() for _ in range(3)]


def _padding(side="left"):
    pad = torch.ones(B, N, dtype=torch.bool)
    pad[0, :4] = False  # left: queries 0..3 of batch 0 see no key under causal
    if side == "right":
        pad = pad.flip(-1)
    return pad


def _positions():
    q = torch.arange(N)[None, None, :, None]
    k = torch.arange(N)[None, None, None, :]
    return q, k


def _additive(keep, dtype=torch.float32):
    return torch.where(keep, torch.zeros((), dtype=dtype), torch.finfo(dtype).min)


SPELLINGS = {
    # keep mask -> scores -> masked scores
    "hf_additive": lambda s, keep: s + _additive(keep),
    "where_keep_finite": lambda s, keep: torch.where(keep, s, torch.finfo(s.dtype).min),
    "masked_fill_hide": lambda s, keep: s.masked_fill(~keep, -1e9),
    "masked_fill_inf": lambda s, keep: s.masked_fill(~keep, float("-inf")),
}


def _site(fn, pad, grad=True):
    sites = assert_equivalent(fn, *_qkv(), pad, expected_sites=1, grad=grad, options=FAST)
    return sites[0]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", SPELLINGS)
def test_causal_and_padding_spellings(name, side):
    """Fully hidden rows (left padding) come out as eager's, forward and gradients: an average over every key for a
    finite fill, NaN for -inf (compared as NaN)."""
    spell = SPELLINGS[name]

    def fn(q, k, v, pad):
        i, j = _positions()
        keep = (j <= i) & pad[:, None, None, :]
        return torch.softmax(spell(q @ k.mT * D ** -0.5, keep), -1) @ v

    site = _site(fn, _padding(side), grad=name != "masked_fill_inf" or side == "right")
    assert site.spec.causal and site.operands["mask_note"] == "key_padding", site.describe()
    assert site.spec.empty_rows == ("nan" if name == "masked_fill_inf" else "average")
    assert site.spec.fill_adds == (name == "hf_additive")


def test_sliding_window_hide_polarity():
    """A mask of hidden keys, or-ed: future keys, keys out of the window, padded keys."""
    def fn(q, k, v, pad):
        i, j = _positions()
        hide = (j > i) | (j <= i - 3) | ~pad[:, None, None, :]
        return torch.softmax((q @ k.mT).masked_fill(hide, -1e4), -1) @ v

    site = _site(fn, _padding())
    assert site.spec.causal and site.spec.window == (2, -1) and site.operands["mask_note"] == "key_padding"


DISTANCE_WINDOWS = {  # a bidirectional sliding window spelled as a distance (ModernBERT's local layers): name ->
    # (keep mask, window)
    "abs_le_kept": (lambda i, j: torch.abs(i - j) <= 2, (2, 2)),
    "abs_gt_hidden": (lambda i, j: ~(abs(j - i) > 3), (3, 3)),
    "bound_first_lt": (lambda i, j: 2 > (j - i).abs(), (1, 1)),
    "shifted_by_one": (lambda i, j: torch.abs(j - (i + 1)) <= 2, (1, 3)),
}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", DISTANCE_WINDOWS)
def test_distance_window_and_padding(name, side):
    """|q - k| <= w is the window (w, w) around the diagonal, not causal; fully hidden rows (left padding) average
    as in eager, forward and gradients."""
    window, expected = DISTANCE_WINDOWS[name]

    def fn(q, k, v, pad):
        i, j = _positions()
        return torch.softmax(q @ k.mT * D ** -0.5 + _additive(window(i, j) & pad[:, None, None, :]), -1) @ v

    site = _site(fn, _padding(side))
    assert not site.spec.causal and site.spec.window == expected, site.describe()
    assert site.operands["mask_note"] == "key_padding" and site.spec.empty_rows == "average"


RANDOM_KEEP = torch.rand(N, N, generator=torch.Generator().manual_seed(3)) > 0.2  # a 0/1 buffer

NOT_STRUCTURE = {
    "varies_per_query": lambda i, j, pad: ((i + j) % 3 != 0) & pad[:, None, None, :],
    "causal_shifted_by_one": lambda i, j, pad: (j < i) & pad[:, None, None, :],
    "random_buffer": lambda i, j, pad: RANDOM_KEEP & (j <= i) & pad[:, None, None, :],
    "distance_beyond_a_band": lambda i, j, pad: (torch.abs(i - j) >= 2) & pad[:, None, None, :],
    "distance_to_twice_the_key": lambda i, j, pad: (torch.abs(i - 2 * j) <= 2) & pad[:, None, None, :],
}


@pytest.mark.parametrize("name", NOT_STRUCTURE)
def test_masks_that_must_stay_tensors(name):
    """A wrong structure is a wrong answer: what is neither structure nor key padding keeps the whole tensor."""
    make = NOT_STRUCTURE[name]

    def fn(q, k, v, pad):
        i, j = _positions()
        return torch.softmax(q @ k.mT * D ** -0.5 + _additive(make(i, j, pad)), -1) @ v

    site = _site(fn, _padding("right"))
    assert not site.spec.causal and site.operands["mask_note"].startswith("tensor: "), site.describe()
    assert site.operands["bias"]


@pytest.mark.parametrize("padded", ["left", "right", None])
def test_structured_padding_bias_after_a_finite_causal_fill(padded):
    """GPT-Neo's spelling: where(causal, s, finfo.min) + where(causal & keep, 0, finfo.min). A key the causal fill
    hides gets two fills (-inf), so the site is causal plus key padding whose fill was added, and a query that sees
    only padded keys is the uniform softmax over them: outputs and gradients equal eager's."""
    def fn(q, k, v, pad):
        i, j = _positions()
        keep = (j <= i) & pad[:, None, None, :] if padded else (j <= i)
        s = torch.where(j <= i, q @ k.mT * D ** -0.5, torch.finfo(q.dtype).min)
        return torch.softmax(s + _additive(keep), -1) @ v

    site = _site(fn, _padding(padded or "left"))
    assert site.spec.causal and site.spec.empty_rows == "nan", site.describe()
    assert site.spec.fill_adds == bool(padded) and (site.operands["mask_note"] == "key_padding") == bool(padded)


def test_structured_padding_bias_beside_another_bias_is_left_alone():
    """GPT-Neo's spelling with a bias on the scores, -inf on a padded key: the queries of batch 0 that see only padded
    keys weigh, in eager, every padded key of their band but that one; the op would weigh it too. Left alone."""
    bias = torch.zeros(N)
    bias[1] = float("-inf")

    def fn(q, k, v, pad, bias):
        i, j = _positions()
        s = torch.where(j <= i, q @ k.mT * D ** -0.5 + bias, torch.finfo(q.dtype).min)
        return torch.softmax(s + _additive((j <= i) & pad[:, None, None, :]), -1) @ v

    site = assert_equivalent(fn, *_qkv(), _padding(), bias, expected_sites=0, options=FAST)[0]
    assert not site.rewritten and "beside another bias" in site.reason, site.describe()


def test_padding_bias_after_a_window_fill_keeps_both_tensors():
    """A sliding-window fill, then a causal (not windowed) padding bias: keys the window hides but the causal bias
    keeps stay at the fill, so a query that sees only padded keys weighs them. No structure holds that; the mask and
    the bias stay tensors, the bias after the fill (bias_last), and outputs and gradients equal eager's."""
    def fn(q, k, v, pad):
        i, j = _positions()
        s = torch.where((j <= i) & (j > i - 3), q @ k.mT * D ** -0.5, torch.finfo(q.dtype).min)
        return torch.softmax(s + _additive((j <= i) & pad[:, None, None, :]), -1) @ v

    site = assert_equivalent(fn, *_qkv(), _padding(), expected_sites=1, options=FAST)[0]
    assert site.spec.bias_last and not site.spec.causal, site.describe()
    assert "not the fill's" in site.operands["mask_note"], site.operands["mask_note"]


CLAMPS = {  # XGLM's torch.max(scores, finfo.min) and other spellings of a clamp from below
    "max": lambda s: torch.max(s, torch.tensor(torch.finfo(s.dtype).min)),
    "maximum": lambda s: torch.maximum(s, torch.tensor(torch.finfo(s.dtype).min)),
    "clamp": lambda s: s.clamp(min=torch.finfo(s.dtype).min),
    "clamp_min": lambda s: torch.clamp_min(s, torch.finfo(s.dtype).min),
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("name", CLAMPS)
def test_scores_clamped_at_the_smallest_finite_number(name, padded):
    """The clamp changes only -inf, and none reaches it after a finite additive mask: the site is what it would be
    without it. But in a fully padded row every score ties with finfo.min, and torch.max / maximum give a tie half
    its gradient: padded, those two spellings are left alone with the reason; clamp keeps the whole gradient."""
    def fn(q, k, v, pad):
        i, j = _positions()
        keep = (j <= i) & pad[:, None, None, :] if padded else (j <= i)
        return torch.softmax(CLAMPS[name](q @ k.mT * D ** -0.5 + _additive(keep)), -1) @ v

    halves = padded and name in ("max", "maximum")
    site = assert_equivalent(fn, *_qkv(), _padding(), expected_sites=0 if halves else 1, options=FAST)[0]
    if halves:
        assert "half their gradient" in site.reason, site.describe()
    else:
        assert site.spec.causal and site.operands["mask_note"] == ("key_padding" if padded else ""), site.describe()


def test_max_after_an_additive_mask_that_stays_a_tensor_is_left_alone():
    """The same tie when the mask is no structure (it stays the op's bias): a row it hides whole would get the
    op's full gradient where eager's max gives half."""
    hide_row = RANDOM_KEEP.clone()
    hide_row[2] = False

    def fn(q, k, v, pad):
        s = q @ k.mT * D ** -0.5 + _additive(hide_row & pad[:, None, None, :])
        return torch.softmax(torch.max(s, torch.tensor(torch.finfo(s.dtype).min)), -1) @ v

    site = assert_equivalent(fn, *_qkv(), _padding(), expected_sites=0, options=FAST)[0]
    assert "half their gradient" in site.reason, site.describe()


@pytest.mark.parametrize("clamp,fill,reason", [
    (lambda s: s.clamp(min=-1e4), -1e9, "not at the smallest finite number"),
    (lambda s: s.clamp(min=torch.finfo(s.dtype).min), float("-inf"), "after a -inf mask fill")])
def test_clamps_that_change_the_scores_are_left_alone(clamp, fill, reason):
    def fn(q, k, v, pad):
        i, j = _positions()
        return torch.softmax(clamp((q @ k.mT).masked_fill(j > i, fill)), -1) @ v

    site = assert_equivalent(fn, *_qkv(), _padding(), expected_sites=0, options=FAST)[0]
    assert reason in site.reason, site.describe()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_bias_after_a_finite_causal_fill(side):
    """transformers 4's GPT-2 (and torch's own pattern 19): where(causal, s, finfo.min) + (1 - pad) * finfo.min,
    a padding bias made by arithmetic on float data (no where(keep, 0, fill) proves its values): a key both hide
    is -inf, one that only the padding hides is the fill. The op takes the mask and the bias as they are, the bias
    after the fill (bias_last): eager's formula, so a fully padded row is eager's too; outputs and gradients."""
    def fn(q, k, v, pad):
        i, j = _positions()
        s = torch.where(j <= i, q @ k.mT * D ** -0.5, torch.finfo(q.dtype).min)
        s = s + (1.0 - pad[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
        return torch.softmax(s, -1) @ v

    site = assert_equivalent(fn, *_qkv(), _padding(side), expected_sites=1, options=FAST)[0]
    assert site.spec.bias_last and "bias_last" in site.describe(), site.describe()


def test_gpt_neo_causal_buffer_then_padding_mask():
    """GPT-Neo as transformers writes it: where(self.bias[...], s, finfo.min) with the causal (or local band)
    buffer, then the model's additive mask. A buffer's values are not in the graph, so no structure is proven; the
    site keeps both tensors with bias_last, and equals eager with left padding, forward and gradients."""
    buffer = torch.ones(N, N, dtype=torch.bool).tril()[None, None]

    def fn(q, k, v, pad, buffer):
        i, j = _positions()
        s = torch.where(buffer, q @ k.mT * D ** -0.5, torch.finfo(q.dtype).min)
        return torch.softmax(s + _additive((j <= i) & pad[:, None, None, :]), -1) @ v

    site = assert_equivalent(fn, *_qkv(), _padding("left"), buffer, expected_sites=1, options=FAST)[0]
    assert site.spec.bias_last and not site.spec.causal, site.describe()


def test_sliding_window_generation_with_left_padding_matches_eager():
    """Greedy generation of a left-padded batch under backend="flashfuse" gives eager's tokens (sliding window)."""
    model, _ = models.build("mistral")
    ids = torch.randint(0, models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = models.padding_mask(2, 9, pads=3)
    import transformers
    lm = transformers.MistralForCausalLM(model.config).eval()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = lm.generate(**kwargs)
    torch._dynamo.reset()
    lm.forward = torch.compile(lm.forward, backend="flashfuse", options=FAST)
    assert torch.equal(lm.generate(**kwargs), expected)


# -- spellings that are not masks ---------------------------------------------------------------------------------

class PerHeadTemperature(torch.nn.Module):
    """A learned temperature per head multiplying the scores: a per-head scale, folded into q."""

    def __init__(self):
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.rand(H, 1, 1, generator=torch.Generator().manual_seed(5)) + 0.5)

    def forward(self, q, k, v):
        return torch.softmax((q @ k.mT) * self.temperature, -1) @ v


def test_learned_per_head_temperature():
    site = assert_equivalent(PerHeadTemperature(), *_qkv(), expected_sites=1, options=FAST)[0]
    assert site.operands["runtime_scale"]


def test_per_query_scale_is_not_a_scale():
    fn = lambda q, k, v, t: torch.softmax((q @ k.mT) * t, -1) @ v  # noqa: E731
    site = assert_equivalent(fn, *_qkv(), torch.rand(N, 1) + 0.5, expected_sites=0, options=FAST)[0]
    assert "scores multiplied by a tensor" in site.reason


def test_windowed_attention_with_two_leading_batch_dims():
    """Scores (B, windows, H, N, N), as windowed attention computes them, with a relative-position bias per head
    and an additive mask per window: the leading dims fold into one batch dim."""
    gen = torch.Generator().manual_seed(2)
    windows = 3
    q, k, v = (torch.randn(B, windows, H, N, D, generator=gen) for _ in range(3))
    rel = torch.randn(H, N, N, generator=gen)
    window_mask = torch.where(torch.rand(windows, N, N, generator=gen) > 0.3, 0.0, -100.0)

    def fn(q, k, v, rel, window_mask):
        s = q @ k.transpose(-2, -1) * D ** -0.5 + rel[None, None] + window_mask[None, :, None]
        return torch.softmax(s, -1) @ v

    site = assert_equivalent(fn, q, k, v, rel, window_mask, expected_sites=1, options=FAST)[0]
    assert site.shape == (B, windows, H, N, N) and site.operands["bias"]


# -- reports ------------------------------------------------------------------------------------------------------

class Router(torch.nn.Module):
    """A mixture-of-experts gate: softmax over a linear layer's logits, then top-k. Not attention."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(D, 4)

    def forward(self, x):
        return torch.softmax(self.gate(x), -1).topk(2, -1).values.sum()


def test_a_router_softmax_is_listed_apart_and_not_counted():
    report = flashfuse.explain(Router(), torch.randn(5, D))
    assert len(report.sites) == 1 and not report.sites[0].attention
    assert "0 of 0 attention sites rewritten" in str(report) and "not attention" in str(report)


class Sinks(torch.nn.Module):
    """gpt-oss's eager attention: a learned logit per head as an extra key column, a row-max shift, the column
    sliced off after the softmax."""

    def __init__(self):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(H, generator=torch.Generator().manual_seed(6)))

    def forward(self, q, k, v, pad):
        i, j = _positions()
        s = q @ k.transpose(2, 3) * D ** -0.5 + _additive((j <= i) & pad[:, None, None, :])
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        logits = torch.cat([s, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        return torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1] @ v


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_sinks(side):
    """Forward and gradients (q, k, v and the sinks) equal eager's, fully hidden rows included."""
    site = assert_equivalent(Sinks(), *_qkv(), _padding(side), expected_sites=1, options=FAST)[0]
    assert site.operands["sink"] and site.spec.causal and site.operands["mask_note"] == "key_padding"


def test_a_cat_that_is_no_sink_is_refused_by_name():
    def fn(q, k, v):
        s = q @ k.mT * D ** -0.5
        p = torch.softmax(torch.cat([s, torch.zeros(B, H, N, 2)], -1), -1)[..., :-2]
        return p @ v

    site = assert_equivalent(fn, *_qkv(), expected_sites=0, options=FAST)[0]
    assert site.attention and "concatenated" in site.reason and "cat" in site.reason


def test_sdpa_math_decomposition_with_safe_softmax():
    """SDPA's math path as aten ops: the scale on q and on k^T (aten.mul.Scalar), aten._safe_softmax (a query that
    sees no key gives 0, not NaN), here with causal structure and left padding as -inf."""
    def fn(q, k, v, pad):
        i, j = _positions()
        keep = (j <= i) & pad[:, None, None, :]
        s = torch.ops.aten.mul.Scalar(q, D ** -0.25) @ torch.ops.aten.mul.Scalar(k.mT, D ** -0.25)
        return torch.ops.aten._safe_softmax(torch.where(keep, s, float("-inf")), -1) @ v

    site = _site(fn, _padding("left"))
    assert site.spec.causal and site.spec.empty_rows == "zero" and site.operands["mask_note"] == "key_padding"
    assert site.spec.scale == pytest.approx(D ** -0.5)


def test_baddbmm_with_a_bias_expanded_from_a_smaller_one():
    """baddbmm over (B * H) with an additive (B * H, N, N) bias built by expanding a (H, N, N) one."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B * H, N, D, generator=gen) for _ in range(3))
    rel = torch.randn(H, N, N, generator=gen)

    def fn(q, k, v, rel):
        bias = rel[None].expand(B, H, N, N).reshape(B * H, N, N)
        return torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=D ** -0.5), -1) @ v

    site = assert_equivalent(fn, q, k, v, rel, expected_sites=1, options=FAST)[0]
    assert site.operands["bias"] and site.spec.scale == pytest.approx(D ** -0.5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi"])
def test_training_batch_without_a_mask_is_causal(family):
    """use_cache=False and no attention_mask, as training runs: transformers builds the causal mask from its
    default position ids (`arange` per row) and ands in a packed-sequence term (ids[b, q] == ids[b, k], ids from
    diff(position_ids)). Both are proven from the graph: plain causal, no mask tensor reaches the op."""
    model, inputs = models.build(family, padding=False, seq=24)
    model.train()
    inputs = dict(inputs, use_cache=False)
    sites = flashfuse.explain(model, **inputs).sites
    assert sites and all(s.rewritten and s.spec.causal and not s.operands.get("mask") for s in sites)
    expected, expected_grads = _run(model, inputs)
    torch._dynamo.reset()
    got, grads = _run(torch.compile(model, backend="flashfuse"), inputs)
    assert relative_error(got, expected) < FORWARD[torch.float32]
    assert gradients_error(grads, expected_grads) < GRADIENT[torch.float32]


def test_packed_sequences_from_user_position_ids_keep_the_mask():
    """Position ids a user passes are data (here two packed sequences a row): the packed-sequence term cannot be
    proven, so the mask stays a tensor, and the answer is still eager's."""
    model, inputs = models.build("llama", padding=False, seq=16)
    positions = torch.arange(8).repeat(2)[None].expand(2, -1)
    inputs = dict(inputs, use_cache=False, position_ids=positions)
    sites = flashfuse.explain(model, **inputs).sites
    assert sites and all(s.rewritten and s.operands.get("mask_note", "").startswith("tensor") for s in sites)
    expected, expected_grads = _run(model, inputs)
    torch._dynamo.reset()
    got, grads = _run(torch.compile(model, backend="flashfuse"), inputs)
    assert relative_error(got, expected) < FORWARD[torch.float32]
    assert gradients_error(grads, expected_grads) < GRADIENT[torch.float32]


def _packed_ids_attention(same_rows):
    """Scores masked by causal positions and by per-row sequence ids (constant within each row, different across
    rows); the query side reads row b, the key side row b (same_rows) or row B - 1 - b."""
    def fn(q, k, v):
        b, _, n, _ = q.shape
        positions = torch.arange(n).unsqueeze(0).expand(b, -1)
        ids = (torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1).cumsum(-1) + torch.arange(b)[:, None]
        rows = torch.arange(b)[:, None, None, None]
        q_pos, k_pos = torch.arange(n)[None, None, :, None], torch.arange(n)[None, None, None, :]
        keep = (positions[rows, k_pos] <= positions[rows, q_pos]) & (
            ids[rows, q_pos] == ids[rows if same_rows else b - 1 - rows, k_pos])
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        return torch.softmax(scores.masked_fill(~keep, -1e9), -1) @ v
    return fn


@pytest.mark.parametrize("same_rows", [True, False])
def test_row_id_term_is_dropped_only_when_both_sides_read_the_same_row(same_rows):
    """ids[b, q] == ids[b, k] holds everywhere when each row of ids is one value; ids[b, q] == ids[b', k] does not
    (rows differ), so that mask stays a tensor. Both equal eager."""
    q, k, v = (torch.randn(2, 2, 12, 16, requires_grad=True) for _ in range(3))
    fn = _packed_ids_attention(same_rows)
    (site,) = flashfuse.explain(fn, q, k, v).sites
    assert site.rewritten and site.spec.causal == same_rows
    assert not site.operands.get("mask") if same_rows else site.operands["mask_note"].startswith("tensor")
    assert_equivalent(fn, q, k, v, expected_sites=1)
