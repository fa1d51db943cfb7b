"""Checking a drawn program: `check_program` (compile, count sites, compare with eager, then with float64)."""
import os
import warnings

from flashfuse.testing.programs.build import Program


def interpreter_active():
    """True when CPU tensors run the Triton kernels through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_program(program: Program, options=None, grad=True):
    """Compile a drawn program with flashfuse and check it: rewritten sites, outputs and gradients.

    Runs `check_equivalence` (count of rewritten sites == program.expected_sites; outputs and gradients
    within the dtype's tolerance of eager, or as close to a float64 run as eager is; a difference that
    stock torch.compile shows too is "upstream" and warned about, not failed).
    `options` defaults to `fuzz_options()` (AOTAutograd without inductor unless $FLASHFUSE_FUZZ_COMPILER
    says otherwise). `grad=False` compares outputs only. Returns the Verdict; raises AssertionError when
    its outcome is "failed".
    """
    from flashfuse.testing.equivalence import UpstreamDifference, check_equivalence
    from flashfuse.testing.profiles import fuzz_options
    options = fuzz_options() if options is None else options
    verdict = check_equivalence(program.module, *program.inputs, expected_sites=program.expected_sites, grad=grad,
                                options=options, source=program.source, seed=program.choices.get("seed", 0))
    if verdict.outcome == "failed":
        raise AssertionError(str(verdict))
    if verdict.outcome == "upstream":
        warnings.warn(UpstreamDifference(str(verdict)), stacklevel=2)
    return verdict
