"""Check that flashfuse's rewrites compute what the original graphs did.

    from flashfuse.testing import assert_equivalent
    assert_equivalent(my_module, x, expected_sites=2)
"""
from flashfuse.testing.equivalence import assert_equivalent, compile_and_report

__all__ = ["assert_equivalent", "compile_and_report"]
