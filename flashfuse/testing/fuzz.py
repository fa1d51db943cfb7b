"""Fuzz your own module against flashfuse: `@fuzz_equivalence(...)`, a Hypothesis-powered test decorator.

    import torch
    from hypothesis import strategies as st
    from flashfuse.testing import fuzz_equivalence

    @fuzz_equivalence(expected_sites=1, batch=st.integers(1, 3), seq=st.integers(1, 16))
    def test_my_attention(batch, seq):
        model = MyAttention(dim=32, heads=4).eval()
        return model, (torch.randn(batch, seq, 32, requires_grad=True),)

The decorated function gets drawn values for the keyword strategies you pass and returns
(module_or_function, inputs); each example is compiled with flashfuse and checked with
`assert_equivalent` (rewritten sites, outputs, gradients). Failures shrink to the smallest values.
The same check is the `flashfuse_fuzz` pytest fixture (flashfuse.testing.pytest_plugin).
"""
import functools
import inspect

from hypothesis import HealthCheck, given, settings

from flashfuse.testing.equivalence import assert_equivalent
from flashfuse.testing.profiles import fuzz_options


def _unpack(made):
    if not isinstance(made, tuple) or len(made) != 2:
        raise TypeError("the function under fuzz_equivalence must return (module_or_function, inputs)")
    fn, inputs = made
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    return fn, tuple(inputs)


def fuzz_equivalence(*, expected_sites=None, grad=True, options=None, max_examples=None, **strategies):
    """Decorator: turn `build(**drawn) -> (module_or_fn, inputs)` into a Hypothesis test of flashfuse.

    Args:
        expected_sites: attention sites that must be rewritten per compilation: an int, None (not
            checked), or a callable taking the drawn values and returning one.
        grad: also compare gradients of float inputs that require grad, and of the module's parameters.
        options: backend options; default `fuzz_options()` ({"compiler": "eager"} unless
            $FLASHFUSE_FUZZ_COMPILER says "inductor").
        max_examples: examples per run; default: the loaded Hypothesis profile's (see profiles.py).
        **strategies: a Hypothesis strategy for each argument of the decorated function. Arguments
            without one are left to pytest (fixtures).

    Every run has no deadline and allows slow examples (each one compiles); the other settings
    come from the loaded Hypothesis profile.
    """
    if not strategies:
        raise TypeError("fuzz_equivalence needs at least one strategy, e.g. seq=st.integers(1, 16)")

    def decorate(build):
        @functools.wraps(build)
        def check(*args, **kwargs):
            fn, inputs = _unpack(build(*args, **kwargs))
            drawn = {name: kwargs[name] for name in strategies if name in kwargs}
            sites = expected_sites(**drawn) if callable(expected_sites) else expected_sites
            assert_equivalent(fn, *inputs, expected_sites=sites, grad=grad,
                              options=fuzz_options() if options is None else options)

        check.__signature__ = inspect.signature(build)
        overrides = {"deadline": None,
                     "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}
        if max_examples is not None:
            overrides["max_examples"] = max_examples
        return settings(**overrides)(given(**strategies)(check))

    return decorate


def run_fuzz(build, *, expected_sites=None, grad=True, options=None, max_examples=None, **strategies):
    """Run the fuzz_equivalence check now (outside a decorator): what the `flashfuse_fuzz` fixture calls."""
    test = fuzz_equivalence(expected_sites=expected_sites, grad=grad, options=options, max_examples=max_examples,
                            **strategies)(build)
    test()
