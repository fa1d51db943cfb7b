"""Checking a drawn program: `check_program` (compile, count sites, compare with eager, then with float64)."""
import copy
import os

import torch

from flashfuse.testing.programs.build import Program


def interpreter_active():
    """True when CPU tensors run the Triton kernels through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_program(program: Program, options=None, grad=True):
    """Compile a drawn program with flashfuse and check it: rewritten sites, outputs and gradients.

    Runs `assert_equivalent` (count of rewritten sites == program.expected_sites; outputs and gradients
    within the dtype's tolerance of eager). A program that misses only the tolerances is judged again
    against a float64 run of the same program (`judge_against_oracle`): bf16 eager is often further from
    the exact result than the fused op, and an exactly-zero gradient (one key per row) is exact in eager
    but rounding noise in any other algorithm.

    `options` defaults to `fuzz_options()` (AOTAutograd without inductor unless $FLASHFUSE_FUZZ_COMPILER
    says otherwise). `grad=False` compares outputs only.
    Returns the Sites found.
    """
    from flashfuse.testing.equivalence import assert_equivalent
    from flashfuse.testing.profiles import fuzz_options
    options = fuzz_options() if options is None else options
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
