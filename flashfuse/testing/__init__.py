"""Check that flashfuse's rewrites compute what the original graphs did.

    from flashfuse.testing import assert_equivalent
    assert_equivalent(my_module, x, expected_sites=2)
"""
from flashfuse.testing.equivalence import (
    UpstreamDifference,
    Verdict,
    assert_equivalent,
    check_equivalence,
    compile_and_report,
)

__all__ = ["assert_equivalent", "check_equivalence", "compile_and_report", "UpstreamDifference", "Verdict"]

# Fuzzing (needs hypothesis, in the `test` extra): imported on first use, so assert_equivalent works without it.
_FUZZING = {"attention_programs": "programs", "build_program": "programs", "check_program": "programs",
            "Program": "programs", "fuzz_equivalence": "fuzz", "load_profile": "profiles", "fuzz_options": "profiles"}
__all__ += list(_FUZZING)


def __getattr__(name):
    if name in _FUZZING:
        import importlib
        return getattr(importlib.import_module(f"flashfuse.testing.{_FUZZING[name]}"), name)
    raise AttributeError(f"module 'flashfuse.testing' has no attribute {name!r}")
