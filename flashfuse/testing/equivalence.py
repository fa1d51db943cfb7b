"""`assert_equivalent`: compile with flashfuse, compare with eager, count the rewritten sites."""
import inspect

import torch

from flashfuse import backend
from flashfuse.tolerances import FORWARD, GRADIENT, gradients_error, relative_error


def compile_and_report(fn, options=None):
    """(compiled fn, list that fills with the Sites of every graph it compiles).

    Resets Dynamo first, so earlier compilations of the same code cannot use up its recompile limit.
    """
    torch._dynamo.reset()
    sites = []

    def flashfuse_with_report(gm, example_inputs):
        backend._LISTENERS.append(sites.extend)
        try:
            return backend.flashfuse_backend(gm, example_inputs, options=dict(options or {}))
        finally:
            backend._LISTENERS.remove(sites.extend)

    return torch.compile(fn, backend=flashfuse_with_report), sites


def _leaves(fn, inputs):
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return [t for t in tensors + params if t.requires_grad]


def _outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    return []


def _describe(fn, source):
    if source is None:
        try:
            source = inspect.getsource(fn.forward if isinstance(fn, torch.nn.Module) else fn)
        except (OSError, TypeError):
            source = repr(fn)
    return source


def assert_equivalent(fn_or_module, *inputs, expected_sites=None, grad=True, options=None, source=None, seed=0):
    """Check that torch.compile(fn, backend="flashfuse") computes what eager does, and count rewrites.

    Args:
        fn_or_module: a function or nn.Module, called as fn(*inputs).
        inputs: its inputs. Float tensors that require grad (and the module's parameters) get
            their gradients compared too when `grad` is set.
        expected_sites: how many attention sites must be rewritten (0 for a program that is not
            attention); None skips the count. A site refused by an internal error always fails the check.
        options: backend options, e.g. {"compiler": "eager"} to skip inductor.
        source: text shown on failure (defaults to the function's source).

    Returns the list of Sites found. Raises AssertionError with the source and the specs on failure.

    Example::

        >>> def attn(q, k, v):
        ...     return torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v
        >>> q, k, v = (torch.randn(2, 4, 16, 64, requires_grad=True) for _ in range(3))
        >>> assert_equivalent(attn, q, k, v, expected_sites=1)
    """
    torch.manual_seed(seed)
    expected = _outputs(fn_or_module(*inputs))
    compiled, sites = compile_and_report(fn_or_module, options)
    torch.manual_seed(seed)
    actual = _outputs(compiled(*inputs))
    problems = [f"site {s.node} was left alone after an internal error (a flashfuse bug): {s.reason}"
                for s in sites if s.reason and s.reason.startswith("internal error")]
    rewritten = sum(s.rewritten for s in sites)
    if expected_sites is not None and rewritten != expected_sites:
        problems.append(f"{rewritten} sites rewritten, expected {expected_sites}")
    if len(actual) != len(expected):
        problems.append(f"{len(actual)} outputs, expected {len(expected)}")
    for i, (a, e) in enumerate(zip(actual, expected)):
        if not e.is_floating_point():
            if not torch.equal(a, e):
                problems.append(f"output {i} differs")
            continue
        err = relative_error(a, e)
        if err >= FORWARD[e.dtype]:
            problems.append(f"output {i}: relative error {err:.2e} >= {FORWARD[e.dtype]:.0e} ({e.dtype})")
    leaves = _leaves(fn_or_module, inputs)
    floats = [(a, e) for a, e in zip(actual, expected) if e.is_floating_point() and e.requires_grad]
    if grad and leaves and floats and not problems:
        cotangents = [torch.randn_like(e) for _, e in floats]
        g_expected = torch.autograd.grad([e for _, e in floats], leaves, cotangents, allow_unused=True)
        g_actual = torch.autograd.grad([a for a, _ in floats], leaves, cotangents, allow_unused=True)
        err = gradients_error(g_actual, g_expected)
        dtype = floats[0][1].dtype
        if err >= GRADIENT[dtype]:
            problems.append(f"gradients: relative error {err:.2e} >= {GRADIENT[dtype]:.0e} ({dtype})")
    if problems:
        specs = "\n".join(f"  {s.node}: rewritten={s.rewritten} spec={s.describe()} reason={s.reason}" for s in sites)
        raise AssertionError("; ".join(problems) + f"\nsites:\n{specs or '  none'}\nprogram:\n"
                             + _describe(fn_or_module, source))
    return sites
