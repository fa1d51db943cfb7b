"""Hypothesis profiles for fuzzing flashfuse, registered in one place.

    FLASHFUSE_HYPOTHESIS_PROFILE=ci|dev|fuzz   which profile `load_profile()` loads (default: ci)
    FLASHFUSE_FUZZ_COMPILER=eager|inductor     what the compiled side runs through (default: eager)

ci    bounded and derandomized: the same programs on every run, a few minutes on 2 CPU cores.
dev   random programs, a few more of them, failures kept in Hypothesis' example database so the next
      run tries them first.
fuzz  long runs (scripts/fuzz_long.py): many random programs, no deadline.

Every profile has no deadline (a compilation takes a second or more) and does not fail on slow data
generation. tests/conftest.py calls `load_profile()`; your own suite can too, or register the profiles
and pick one with Hypothesis' own `--hypothesis-profile`.
"""
import os

from hypothesis import HealthCheck, Phase, settings

PROFILE_ENV = "FLASHFUSE_HYPOTHESIS_PROFILE"
COMPILER_ENV = "FLASHFUSE_FUZZ_COMPILER"
DEFAULT_PROFILE = "ci"

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)

PROFILES = {
    # explicit examples, then generation and shrinking; no database, so a CI run never depends on an earlier one
    "ci": dict(_COMMON, max_examples=30, derandomize=True, database=None,
               phases=[Phase.explicit, Phase.generate, Phase.shrink]),
    "dev": dict(_COMMON, max_examples=100),
    "fuzz": dict(_COMMON, max_examples=10_000),
}

def register_profiles():
    """Register ci, dev and fuzz with Hypothesis (idempotent)."""
    for name, kwargs in PROFILES.items():
        settings.register_profile(name, **kwargs)


def profile_name(name=None):
    """The profile asked for: `name`, else $FLASHFUSE_HYPOTHESIS_PROFILE, else ci."""
    name = name or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r}: the profiles are {sorted(PROFILES)}")
    return name


def load_profile(name=None):
    """Register the profiles and load one (see `profile_name`); returns its name."""
    register_profiles()
    name = profile_name(name)
    settings.load_profile(name)
    return name


def fuzz_options(compiler=None):
    """Backend options for fuzzing: {"compiler": "eager"} unless `compiler` or $FLASHFUSE_FUZZ_COMPILER says otherwise.

    "eager" runs the rewritten graph through AOTAutograd without inductor: gradients are still
    checked, and each program compiles in a fraction of inductor's time.
    """
    compiler = compiler or os.environ.get(COMPILER_ENV) or "eager"
    if compiler not in ("eager", "inductor"):
        raise ValueError(f"{COMPILER_ENV}={compiler!r}: use 'eager' or 'inductor'")
    return {"compiler": compiler}
