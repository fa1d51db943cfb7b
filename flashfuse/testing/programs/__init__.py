"""Random attention programs for fuzzing the matcher: `attention_programs()`, a Hypothesis strategy.

Each drawn `Program` is an `nn.Module` written as Python source text from a set of named choices
(how q/k/v are laid out, how the scores are produced, scaled, capped, biased and masked, which
softmax, dropout, GQA and output spelling), then exec'd, so `program.source` is exactly what runs:

    from hypothesis import given
    from flashfuse.testing import attention_programs, check_program

    @given(attention_programs())
    def test_matcher(program):
        check_program(program)        # rewritten sites == program.expected_sites, same outputs and grads

Attention programs use only spellings the matcher supports and must be rewritten once per site.
Near misses (`program.is_attention` False) take an attention program and change its meaning in
one place (softmax over queries, a missing transpose, weights returned, a small fill value...):
they must be left alone (0 sites) and still compute what eager does.

Every choice is drawn with `sampled_from` (sizes too: uniform, where `integers` favours the ends),
simplest option first, and the source is built from the choices alone, so Hypothesis shrinks a
failure to a short program. `build_program(choices)` rebuilds a program from its `choices` dict, for
regression tests.

The package: choices.py draws the choices; writer.py (with scores.py and masks.py) writes the source;
build.py execs it into a `Program`; check.py checks one against eager and float64.
"""
from typing import Optional

from hypothesis import assume
from hypothesis import strategies as st

from flashfuse.testing.programs.build import NaNProgram, Program, build_program
from flashfuse.testing.programs.check import (
    check_program,
    interpreter_active,
)
from flashfuse.testing.programs.choices import (
    FILLS,
    K_UNTRANSPOSES,
    LAYOUTS,
    LAYOUTS_3D,
    LAYOUTS_4D,
    NEAR_MISSES,
    PATTERNS_3D,
    PATTERNS_4D,
    SMALL_FILLS,
    TRANSPOSES,
    draw_choices,
)

__all__ = ["FILLS", "K_UNTRANSPOSES", "LAYOUTS", "LAYOUTS_3D", "LAYOUTS_4D", "NEAR_MISSES",
           "OPEN_BUGS", "PATTERNS_3D", "PATTERNS_4D", "SMALL_FILLS", "TRANSPOSES",
           "NaNProgram", "Program", "attention_programs", "build_program", "check_program", "interpreter_active"]

#: Open bugs the drawn programs can steer around, by name, so that a long run finds new ones: each gets a strict
#: xfail regression test in tests/test_fuzz.py and a condition on `name in avoid` in choices.draw_choices; drop
#: both once it is fixed. The fixed ones keep their regression tests (tests/test_fuzz.py, "regressions").
OPEN_BUGS = {}  # none open: bf16_peaked_gradients (fuzzing.md #10, #12) was fixed by spec.fp32_delta


def attention_programs(attention: Optional[bool] = None, dtypes=("float32", "float32", "float32", "bfloat16"),
                       max_batch: int = 2, max_heads: int = 4, max_seq: int = 12, head_dims=(8, 16, 24),
                       avoid=tuple(OPEN_BUGS)):
    """A Hypothesis strategy of random `Program`s.

    Args:
        attention: True draws only attention programs, False only near misses, None both (about half each).
        dtypes: dtype names to draw from (repeat one to draw it more often); the first is what shrinking
            goes to.
        max_batch, max_heads, max_seq: bounds of B, H and of Nq, Nk (each at least 1; near misses that
            need Nk == D go over max_seq).
        head_dims: head dims D (and Dv) to draw from.
        avoid: names of OPEN_BUGS whose programs are not drawn (default: all of them); () draws everything.
    """
    unknown = set(avoid) - set(OPEN_BUGS)
    if unknown:
        raise ValueError(f"unknown names in avoid: {sorted(unknown)}; known: {sorted(OPEN_BUGS)}")
    dtypes = tuple(str(d).replace("torch.", "") for d in dtypes)
    return _programs(attention, dtypes, max_batch, max_heads, max_seq, tuple(head_dims), frozenset(avoid))


@st.composite
def _programs(draw, *args):
    try:
        return build_program(draw(draw_choices(*args)))
    except NaNProgram:
        assume(False)
