"""Tolerances by dtype, in one place: ||actual - expected|| / ||expected|| must stay under these.

The error is relative to the whole tensor's norm, so single values near zero do not dominate
(an elementwise atol would be needed for those). fp32 forward passes compare against a float64
oracle; `TF32` covers fp32 kernels whose products run in tf32 (torch.backends.cuda.matmul.allow_tf32).
"""
import torch

FORWARD = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
GRADIENT = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}
TF32 = {"forward": 2e-3, "gradient": 5e-3}
#: The FP8 forward (kernels/fp8.py) against float64 on random inputs: e4m3 keeps 3 mantissa bits, and q, k, v and
#: P each lose about 2^-5 to rounding; measured 4-5e-2 (bench/fp8_accuracy.py), bf16 5e-3.
FP8_FORWARD = 0.1
#: The float64 rule of flashfuse.testing.check_equivalence: a compiled result further from eager than the tolerance
#: still passes when it is within FLOAT64_SLACK x max(tol x ||o||, ||eager - o||, ROUNDING_FLOOR x total) of the
#: float64 run o (total: the norm of all gradients together).
FLOAT64_SLACK = 2.0
#: bf16's and fp16's eps; for float32 5e-5 of the gradients' total norm. With one key per row a flash backward's
#: dS = P * (dP - rowsum(dO * O)) cancels to rounding noise where eager's softmax backward gives exactly 0, and a
#: learned temperature t multiplies that noise by |scores| / t: torch's own flash-attention backward (SDPA, CPU) gives
#: such a temperature over one key 1.3e-5 of the total (tests/test_fuzz.py), programs with a softcap up to 3e-5.
ROUNDING_FLOOR = {torch.float32: 5e-5, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
                  torch.float16: torch.finfo(torch.float16).eps, torch.float64: 1e-12}
#: A gradient that is zero in exact arithmetic (a bias broadcast over keys shifts whole softmax rows) may be
#: rounding noise up to this fraction of max|dout| x Nk.
ZERO_GRADIENT = 1e-3


def relative_error(actual, expected):
    """||actual - expected|| / ||expected|| in float64; NaN in either side counts as infinite error."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        same_nans = torch.equal(torch.isnan(actual), torch.isnan(expected))
        if not same_nans:
            return float("inf")
        keep = ~torch.isnan(expected)
        actual, expected = actual[keep], expected[keep]
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual, expected, dtype, what="forward", name="output"):
    """Assert the relative error of `actual` is within the tolerance for `dtype` and `what`."""
    table = FORWARD if what == "forward" else GRADIENT
    tol = table[dtype]
    err = relative_error(actual, expected)
    assert err < tol, f"{name}: relative error {err:.3e} exceeds the {dtype} {what} tolerance {tol:.0e}"
    return err


def gradients_error(actual, expected):
    """Largest per-tensor error over a list of gradients (None entries skipped).

    Each tensor's error is relative to max(its own norm, 1e-2 x the norm of all gradients together),
    so a gradient that is zero in exact arithmetic (a key-projection bias, whose shift every softmax
    row cancels; q and k when there is a single key) is judged against the gradients' overall scale
    instead of its own rounding noise.
    """
    pairs = [(a, e) for a, e in zip(actual, expected) if e is not None]
    if any(a is None for a, _ in pairs):
        return float("inf")
    total = sum(e.detach().double().norm().item() ** 2 for _, e in pairs) ** 0.5
    worst = 0.0
    for a, e in pairs:
        a, e = a.detach().double(), e.detach().double()
        if torch.isnan(a).any() != torch.isnan(e).any():
            return float("inf")
        worst = max(worst, (a - e).norm().item() / max(e.norm().item(), 1e-2 * total, 1e-30))
    return worst
