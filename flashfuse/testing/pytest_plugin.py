"""pytest plugin: the `flashfuse_fuzz` fixture.

Enable it with `pytest -p flashfuse.testing.pytest_plugin`, with `pytest_plugins = ["flashfuse.testing.pytest_plugin"]`
in your top-level conftest.py, or by importing the fixture into a test module:
`from flashfuse.testing.pytest_plugin import flashfuse_fuzz  # noqa: F401`.

    def test_my_attention(flashfuse_fuzz):
        flashfuse_fuzz(lambda seq: (MyAttention().eval(), (torch.randn(2, seq, 32),)),
                       seq=st.integers(1, 16), expected_sites=1)

    def test_the_matcher(flashfuse_fuzz):
        flashfuse_fuzz.programs(max_examples=20)    # random attention programs and near misses

It registers flashfuse's Hypothesis profiles (ci, dev, fuzz) but loads none: pick one with
`--hypothesis-profile=ci` or `flashfuse.testing.profiles.load_profile()` in your conftest.
"""
import pytest
from hypothesis import HealthCheck, given, settings

from flashfuse.testing.fuzz import run_fuzz
from flashfuse.testing.profiles import register_profiles

register_profiles()


class FlashfuseFuzz:
    """Callable fixture object: `flashfuse_fuzz(build, **strategies)` runs run_fuzz (see fuzz_equivalence)."""

    def __call__(self, build, *, expected_sites=None, grad=True, options=None, max_examples=None, **strategies):
        run_fuzz(build, expected_sites=expected_sites, grad=grad, options=options, max_examples=max_examples,
                 **strategies)

    def programs(self, *, max_examples=None, options=None, **strategy_kwargs):
        """Fuzz flashfuse itself with attention_programs(**strategy_kwargs), checking each with check_program."""
        from flashfuse.testing.programs import attention_programs, check_program
        overrides = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
        if max_examples is not None:
            overrides["max_examples"] = max_examples

        @settings(**overrides)
        @given(attention_programs(**strategy_kwargs))
        def run(program):
            check_program(program, options=options)

        run()


@pytest.fixture
def flashfuse_fuzz():
    """Fuzz a module (or function) against flashfuse with Hypothesis: see FlashfuseFuzz."""
    return FlashfuseFuzz()
