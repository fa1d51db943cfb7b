"""`AttentionSpec`: everything about one attention site that is not a tensor, from the matcher to the kernels.

For q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) with Hq % Hkv == 0 (query head h reads key/value
head h // (Hq / Hkv)), the op computes

    s = scale * q @ k^T                            (fp32)
    s = softcap * tanh(s / softcap)                (softcap > 0)
    s = s + bias                                   (a float tensor broadcast to (B, Hq, Nq, Nk))
    s = where(mask, s, mask_value)                 (a bool tensor broadcast likewise; True keeps the key)
                                                   (bias_last: the mask first, then the bias)
    s = -inf where key j is not visible to query i (causal, window: `key_bounds`)
    p = softmax(s, -1); p = dropout(p, dropout_p)
    out = p @ v                                    (in q's dtype)

A query that sees no key (every s is -inf, or the mask's finite fill) follows `empty_rows`: "nan" gives the
formula's answer (NaN when every s is -inf), "zero" gives 0 (SDPA's rule), "average" gives the mean of v over
all Nk keys (eager's answer when one finite fill hides the whole row; hidden_rows.py), without dropout. With
fill_adds (the fill was added to the scores, as `s + where(keep, 0, finfo.min)` does) a filled score passes its
gradient on to q and k as eager's autograd gives it: through the score the fill swallowed. That matters only
in a row every key of which is filled: its softmax is uniform, over all Nk keys with "average", over the keys
the structure shows with "nan" (eager's answer when the structure's own fill meets the added one and the sum
overflows to -inf: `where(causal, s, finfo.min) + where(causal & keep, 0, finfo.min)`). With bias_last the bias is
added after the mask's fill, `where(mask, s, mask_value) + bias`, as GPT-Neo adds its attention_mask to scores
its causal buffer filled: a key that both hide gets fill + fill (-inf), one that one of them hides the fill, so a
query that sees no key weighs exactly the keys eager's softmax does.

With fp32_delta (set for half-precision training: rewrite and `flashfuse.attention` turn it on when q, k or v
need a gradient) the forward also writes out's rounding residual, (fp32 out) - (out in q's dtype), so that the
backward's delta = rowsum(dO * O) reads O as the fp32 accumulator held it. Each row's dS = P * (dP - delta) sums
to zero only with that delta: from the rounded O, a peaked softmax's dq and dk were several times further from
float64 than eager's (tests/test_fuzz.py, bf16_peaked_gradients). It costs one more (B, Hq, Nq, Dv) tensor.

With fp8 ("plain" or "incoherent") q, k and v are quantized to float8_e4m3fn first and P to e4m3 for p @ v
(fp8.py, flash_fp8.py): the same formula to FP8's precision, forward only (inference), no bias or dropout.

What the tensors already say stays out of the spec: sizes, the GQA group Hq / Hkv, dtypes (dynamic shapes make sizes
symbolic; the output takes q's dtype), and whether a bias or mask is given. A key-padding mask is a mask of
shape (B, 1, 1, Nk).

The op's schema carries a spec as one string (`encode` / `decode`), so a new scalar feature is a new field
here, read where the kernels and the CPU path use it; nothing in between restates it.
"""
import dataclasses
import functools
import math
from dataclasses import dataclass

EMPTY_ROWS = ("nan", "zero", "average")
FP8_MODES = ("", "plain", "incoherent")

#: A fill at or below this swallows any score or bias added to it (|s| < 1e22) in fp32, bf16 and fp64, and
#: exp(fill - row max) is 0 for any row that sees a real score: such a fill hides keys as -inf does, except in
#: a row that sees no key at all.
HUGE_FILL = -1e30


@dataclass(frozen=True)
class AttentionSpec:
    """What an attention site computes besides its tensors (the formula is in this module's docstring).

    Example::

        >>> spec = AttentionSpec(scale=0.125, causal=True)
        >>> spec.encode()
        'scale=0.125,causal=True'
        >>> AttentionSpec.decode(spec.encode()) == spec
        True
    """
    scale: float = 1.0
    softcap: float = 0.0  # 0: none
    causal: bool = False  # hide key j > i + Nk - Nq (aligned at the bottom right)
    window: tuple = (-1, -1)  # (left, right) keys visible around the aligned diagonal; -1 unbounded
    dropout_p: float = 0.0
    mask_value: float = float("-inf")  # what the mask tensor fills hidden scores with
    empty_rows: str = "nan"  # a query that sees no key: "nan" (the formula), "zero" or "average" (mean of v)
    fill_adds: bool = False  # the mask's fill was added to the scores (s + fill), not put in their place
    fp8: str = ""  # "": q, k, v as given; "plain" or "incoherent": quantized to e4m3 first (fp8.py), forward only
    bias_last: bool = False  # the bias is added after the mask's fill, not before
    fp32_delta: bool = False  # the forward also returns out's rounding residual, for the backward's delta

    def __post_init__(self):
        _check_real("scale", self.scale)
        _check_real("softcap", self.softcap)
        if self.softcap < 0:
            raise ValueError(f"softcap must be positive (0 for none), got {self.softcap}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal must be a bool, got {type(self.causal).__name__}")
        window = self.window
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window)):
            raise ValueError(f"window must be (left, right) with ints >= -1 (-1 is unbounded), got {window!r}")
        object.__setattr__(self, "window", (int(window[0]), int(window[1])))
        _check_real("dropout_p", self.dropout_p)
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {self.dropout_p}")
        if not isinstance(self.mask_value, (int, float)) or math.isnan(self.mask_value) or self.mask_value == math.inf:
            raise ValueError(f"mask_value must be a number below +inf, got {self.mask_value!r}")
        if self.empty_rows not in EMPTY_ROWS:
            raise ValueError(f"empty_rows must be one of {EMPTY_ROWS}, got {self.empty_rows!r}")
        if not isinstance(self.fill_adds, bool):
            raise ValueError(f"fill_adds must be a bool, got {type(self.fill_adds).__name__}")
        if self.fill_adds and (self.empty_rows == "zero" or self.softcap or not math.isfinite(self.mask_value)):
            raise ValueError("fill_adds needs a finite mask_value, empty_rows 'average' or 'nan', and no softcap "
                             "(hidden_rows.py says why)")
        for name in ("bias_last", "fp32_delta"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.fp8 not in FP8_MODES:
            raise ValueError(f"fp8 must be one of {FP8_MODES}, got {self.fp8!r}")
        if self.fp8 and (self.dropout_p or self.fp32_delta):
            raise ValueError("fp8 is for inference: it takes no dropout and no fp32_delta")
        for name in ("scale", "softcap", "dropout_p", "mask_value"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def key_bounds(self):
        """(left, right): query i sees keys j with i + shift - left <= j <= i + shift + right, shift = Nk - Nq;
        -1 leaves a side unbounded. Causal caps right at 0. The kernels take these as constexprs and
        `reference.visible` builds its mask from them: the one statement of the visibility rule."""
        left, right = self.window
        if self.causal:
            right = 0 if right < 0 else min(right, 0)
        return left, right

    @property
    def random(self):
        """True when the site draws random numbers (dropout): the op then takes a seed tensor."""
        return self.dropout_p > 0.0

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def encode(self):
        """The op schema's form: the fields that differ from their defaults, as `name=value` joined by commas."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={value[0]}:{value[1]}" if f.name == "window" else f"{f.name}={value!r}")
        return ",".join(parts).replace("'", "")

    @staticmethod
    def decode(text):
        """The spec `encode` wrote (cached: the op decodes the same few strings on every call)."""
        return _decode(text)

    def describe(self):
        """Short text for reports: scale always, then what is not the default."""
        shown = [f"scale={round(self.scale, 6)}"]
        if self.causal:
            shown.append("causal")
        if self.window != (-1, -1):
            shown.append(f"window={self.window}")
        if self.softcap:
            shown.append(f"softcap={self.softcap}")
        if self.dropout_p:
            shown.append(f"dropout_p={self.dropout_p}")
        if self.empty_rows != "nan":
            shown.append(f"empty_rows={self.empty_rows}")
        if self.fill_adds:
            shown.append("fill_adds")
        if self.bias_last:
            shown.append("bias_last")
        if self.fp8:
            shown.append(f"fp8={self.fp8}")
        if self.fp32_delta:
            shown.append("fp32_delta")
        return " ".join(shown)


_FIELDS = {f.name: f for f in dataclasses.fields(AttentionSpec)}


@functools.lru_cache(maxsize=1024)
def _decode(text):
    values = {}
    for part in filter(None, text.split(",")):
        name, _, raw = part.partition("=")
        if name not in _FIELDS:
            raise ValueError(f"unknown AttentionSpec field {name!r} in {text!r}")
        if name == "window":
            left, right = raw.split(":")
            values[name] = (int(left), int(right))
        elif name in ("causal", "fill_adds", "bias_last", "fp32_delta"):
            values[name] = raw == "True"
        elif name in ("empty_rows", "fp8"):
            values[name] = raw
        else:
            values[name] = float(raw)
    return AttentionSpec(**values)


def _check_real(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite real number, got {x!r}")
