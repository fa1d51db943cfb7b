"""`assert_equivalent` / `check_equivalence`: compile with flashfuse, compare with eager, judge as an expert would.

When the compiled program misses eager by more than the dtype's tolerance, two more runs decide whose
difference it is:
- stock torch.compile (the same backend options without flashfuse's rewrite): when it shows the same
  difference from eager (NaN where eager is finite, or the same wrong values), the outcome is "upstream";
- a float64 run of the same program (the oracle; float32 for a half-precision program whose float64 run fails
  or has NaN where eager has none): when the compiled program is not meaningfully further
  from it than eager is (tolerances.FLOAT64_RULE), the outcome is "float64", a pass with the evidence.
Otherwise the outcome is "failed". A wrong count of rewritten sites, a site refused by an internal error,
or differing non-float outputs always fail.
"""
import copy
import inspect
import warnings
from dataclasses import dataclass, field

import torch

from flashfuse import backend
from flashfuse.tolerances import FLOAT64_SLACK, FORWARD, GRADIENT, ROUNDING_FLOOR, gradients_error, relative_error

OUTCOMES = ("equal", "float64", "upstream", "failed")


class UpstreamDifference(UserWarning):
    """Stock torch.compile differs from eager the way the flashfuse-compiled program does: not flashfuse's fault."""


@dataclass
class Verdict:
    """What check_equivalence found. outcome: "equal" (within tolerance of eager), "float64" (further from eager
    than the tolerance, but as close to a float64 run as eager is), "upstream" (stock torch.compile differs
    from eager the same way), or "failed". problems: the differences from eager; evidence: the float64 or
    stock-compile findings behind the outcome."""
    outcome: str
    sites: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    evidence: list = field(default_factory=list)
    source: str = ""

    def __str__(self):
        specs = "\n".join(f"  {s.node}: rewritten={s.rewritten} spec={s.describe()} reason={s.reason}"
                          for s in self.sites)
        lines = [f"outcome: {self.outcome}", "against eager: " + ("; ".join(self.problems) or "equal")]
        lines += [f"evidence: {e}" for e in self.evidence]
        return "\n".join(lines + [f"sites:\n{specs or '  none'}", f"program:\n{self.source}"])


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


def _outputs(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "values"):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    return []


def _leaves(fn, inputs):
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return [t for t in tensors + params if t.requires_grad]


def _run(fn, inputs, leaves, seed, grad):
    """(outputs, gradients of the leaves) of fn(*inputs); cotangents drawn from `seed`, the same for every run."""
    torch.manual_seed(seed)
    outs = _outputs(fn(*inputs))
    wanted = [o for o in outs if o.is_floating_point() and o.requires_grad]
    if not (grad and leaves and wanted):
        return outs, []
    generator = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=generator).to(o.device, o.dtype) for o in wanted]
    return outs, list(torch.autograd.grad(wanted, leaves, cotangents, allow_unused=True))


def _describe(fn, source):
    if source is None:
        try:
            source = inspect.getsource(fn.forward if isinstance(fn, torch.nn.Module) else fn)
        except (OSError, TypeError):
            source = repr(fn)
    return source


def _numerical_problems(actual, expected, dtype):
    """Differences beyond tolerance between two runs' (outputs, gradients)."""
    (a_out, a_grad), (e_out, e_grad) = actual, expected
    problems = []
    for i, (a, e) in enumerate(zip(a_out, e_out)):
        if e.is_floating_point():
            err = relative_error(a, e)
            if err >= FORWARD[e.dtype]:
                problems.append(f"output {i}: relative error {err:.2e} >= {FORWARD[e.dtype]:.0e} ({e.dtype})")
    if e_grad:
        err = gradients_error(a_grad, e_grad)
        if err >= GRADIENT[dtype]:
            problems.append(f"gradients: relative error {err:.2e} >= {GRADIENT[dtype]:.0e} ({dtype})")
    return problems


def _same_difference(compiled, stock, dtype):
    """True when the flashfuse-compiled run matches the stock-compiled one (the same NaNs, the same values)."""
    (c_out, c_grad), (s_out, s_grad) = compiled, stock
    for c, s in zip(c_out + c_grad, s_out + s_grad):
        if c is None or s is None:
            if (c is None) != (s is None):
                return False
            continue
        if not c.is_floating_point():
            continue
        if not torch.equal(torch.isnan(c), torch.isnan(s)):
            return False
        if relative_error(c, s) >= GRADIENT[dtype]:
            return False
    return True


def _precise_run(fn, inputs, seed, grad, dtype=torch.float64):
    """The program in `dtype`: a deep copy of a module converted, float inputs cast; None if it cannot run."""
    fn_p = copy.deepcopy(fn).to(dtype) if isinstance(fn, torch.nn.Module) else fn
    inputs_p = tuple(x.detach().to(dtype).requires_grad_(x.requires_grad)
                     if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)
    try:
        return _run(fn_p, inputs_p, _leaves(fn_p, inputs_p), seed, grad)
    except Exception:  # a program with dtype-specific constants may not run in double
        return None


def _oracle(fn, inputs, seed, grad, dtype, eager):
    """(run, its dtype's name, why the ones before it failed): float64, or for a half-precision program float32
    when float64 fails (a program's own cast to float32 turns float64's finfo.min fill into -inf, say)."""
    why = []
    for precise in (torch.float64, torch.float32) if dtype in (torch.bfloat16, torch.float16) else (torch.float64,):
        name = str(precise).replace("torch.", "")
        run = _precise_run(fn, inputs, seed, grad, precise)
        if run is None:
            why.append(f"the program does not run in {name}")
        elif any(_distance(e, o) == float("inf") for e, o in zip(eager[0] + eager[1], run[0] + run[1])):
            why.append(f"the {name} run has NaN where eager has none")
        else:
            return run, name, why
    return None, None, why


def _norm(t):
    return t.detach().double().norm().item() if t is not None else 0.0


def _distance(a, b):
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.detach().double().to(b.device), b.detach().double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    keep = ~torch.isnan(b)
    return (a[keep] - b[keep]).norm().item()


def judge_float64(compiled, eager, oracle, dtype, oracle_name="float64"):
    """The float64 rule (tolerances.FLOAT64_SLACK, ROUNDING_FLOOR): [] when every output and gradient c of the
    compiled run satisfies ||c - o|| <= FLOAT64_SLACK * max(tol * ||o||, ||e - o||, eps * total), with o the
    float64 run, e eager, tol the dtype's tolerance (gradients: ||o|| floored at 1e-2 x total, as
    tolerances.gradients_error does), total the norm of all gradients (for outputs: ||o||) and eps
    ROUNDING_FLOOR[dtype] (the most a quantity that is zero in exact arithmetic can be trusted to);
    else what breaks it, naming the precise run `oracle_name` (float32 when _oracle fell back to it)."""
    (c_out, c_grad), (e_out, e_grad), (o_out, o_grad) = compiled, eager, oracle
    eps = ROUNDING_FLOOR.get(dtype, torch.finfo(dtype).eps)
    problems = []
    for i, (c, e, o) in enumerate(zip(c_out, e_out, o_out)):
        if not o.is_floating_point():
            continue
        allowed = FLOAT64_SLACK * max(FORWARD[dtype] * _norm(o), _distance(e, o), eps * _norm(o))
        if not _distance(c, o) <= allowed:
            problems.append(f"output {i}: {_distance(c, o):.3g} from {oracle_name} > {allowed:.3g} allowed "
                            f"(eager's {_distance(e, o):.3g}, norm {_norm(o):.3g})")
    total = sum(_norm(o) ** 2 for o in o_grad) ** 0.5
    for i, (c, e, o) in enumerate(zip(c_grad, e_grad, o_grad)):
        scale = max(_norm(o), 1e-2 * total)
        allowed = FLOAT64_SLACK * max(GRADIENT[dtype] * scale, _distance(e, o), eps * total)
        if not _distance(c, o) <= allowed:
            problems.append(f"gradient {i}: {_distance(c, o):.3g} from {oracle_name} > {allowed:.3g} allowed "
                            f"(eager's {_distance(e, o):.3g}, norm {_norm(o):.3g}, all gradients {total:.3g})")
    return problems


def check_equivalence(fn_or_module, *inputs, expected_sites=None, grad=True, options=None, source=None,
                      seed=0) -> Verdict:
    """Compile fn(*inputs) with flashfuse and judge it against eager, stock torch.compile and float64.

    Arguments as for `assert_equivalent`. Returns a Verdict; never raises for a difference it finds.
    """
    source = _describe(fn_or_module, source)
    leaves = _leaves(fn_or_module, inputs)
    eager = _run(fn_or_module, inputs, leaves, seed, grad)
    compiled_fn, sites = compile_and_report(fn_or_module, options)
    compiled = _run(compiled_fn, inputs, leaves, seed, grad)
    verdict = Verdict("equal", sites, source=source)
    structural = [f"site {s.node} was left alone after an internal error (a flashfuse bug): {s.reason}"
                  for s in sites if s.reason and s.reason.startswith("internal error")]
    rewritten = sum(s.rewritten for s in sites)
    if expected_sites is not None and rewritten != expected_sites:
        structural.append(f"{rewritten} sites rewritten, expected {expected_sites}")
    if len(compiled[0]) != len(eager[0]):
        structural.append(f"{len(compiled[0])} outputs, expected {len(eager[0])}")
    structural += [f"output {i} differs" for i, (a, e) in enumerate(zip(compiled[0], eager[0]))
                   if not e.is_floating_point() and not torch.equal(a, e)]
    floats = [o for o in eager[0] if o.is_floating_point()]
    dtype = floats[0].dtype if floats else torch.float32
    verdict.problems = structural + _numerical_problems(compiled, eager, dtype)
    if structural:
        verdict.outcome = "failed"
    elif verdict.problems:
        verdict.outcome = _second_opinion(verdict, fn_or_module, inputs, leaves, seed, grad, options, dtype,
                                          compiled, eager)
    return verdict


def _second_opinion(verdict, fn, inputs, leaves, seed, grad, options, dtype, compiled, eager):
    stock_fn, _ = compile_and_report(fn, dict(options or {}, rewrite=False))
    stock = _run(stock_fn, inputs, leaves, seed, grad)
    stock_problems = _numerical_problems(stock, eager, dtype)
    if stock_problems and _same_difference(compiled, stock, dtype):
        verdict.evidence.append("stock torch.compile (no flashfuse rewrite) differs from eager the same way: "
                                + "; ".join(stock_problems))
        return "upstream"
    oracle, name, why = _oracle(fn, inputs, seed, grad, dtype, eager)
    if oracle is None:
        verdict.evidence.append("; ".join(why) + ": no judgement against it")
        return "failed"
    if why:
        verdict.evidence.append("; ".join(why) + f": judged against the {name} run")
    problems = judge_float64(compiled, eager, oracle, dtype, name)
    if problems:
        verdict.evidence += problems
        return "failed"
    verdict.evidence.append(f"as close to a {name} run of the program as eager is (tolerances.FLOAT64_SLACK)")
    return "float64"


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
        seed: seeds torch before each run (dropout) and the cotangents of the gradients.

    Returns the list of Sites found. Raises AssertionError (with the source, the sites and the evidence) when
    the outcome is "failed"; warns UpstreamDifference when it is "upstream" (stock torch.compile differs from
    eager the same way); passes a "float64" outcome (see check_equivalence).

    Example::

        >>> def attn(q, k, v):
        ...     return torch.softmax(q @ k.transpose(-1, -2) / 8, dim=-1) @ v
        >>> q, k, v = (torch.randn(2, 4, 16, 64, requires_grad=True) for _ in range(3))
        >>> assert_equivalent(attn, q, k, v, expected_sites=1)
    """
    verdict = check_equivalence(fn_or_module, *inputs, expected_sites=expected_sites, grad=grad, options=options,
                                source=source, seed=seed)
    if verdict.outcome == "failed":
        raise AssertionError(str(verdict))
    if verdict.outcome == "upstream":
        warnings.warn(UpstreamDifference(str(verdict)), stacklevel=2)
    return verdict.sites
