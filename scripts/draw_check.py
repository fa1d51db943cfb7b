"""A derandomized draw of the fuzzer's programs through the public `assert_equivalent`, as a user would run it:
the same programs on every run, each failure printed with its program, and a count at the end.

    python scripts/draw_check.py attention 60                # attention programs, compiled with inductor
    python scripts/draw_check.py near 300 --compiler eager   # near misses, AOTAutograd without inductor

A difference that stock inductor shows too is "upstream" (a warning, counted apart), not a failure.
"""
import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from flashfuse.testing import UpstreamDifference, assert_equivalent  # noqa: E402
from flashfuse.testing.programs import attention_programs  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["attention", "near"])
    parser.add_argument("examples", type=int)
    parser.add_argument("--compiler", choices=["inductor", "eager"], default="inductor")
    args = parser.parse_args(argv)
    options = None if args.compiler == "inductor" else {"compiler": "eager"}
    counts = {"programs": 0, "failed": 0, "upstream": 0}
    start = time.time()

    @settings(max_examples=args.examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(attention_programs(attention=args.kind == "attention"))
    def run(program):
        counts["programs"] += 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UpstreamDifference)
            try:
                assert_equivalent(program.module, *program.inputs, expected_sites=program.expected_sites,
                                  options=options)
            except AssertionError as exc:
                counts["failed"] += 1
                print(f"FAILED {program}\n{exc}\n", flush=True)
        counts["upstream"] += sum(issubclass(w.category, UpstreamDifference) for w in caught)

    run()
    print(f"{args.kind} x {args.examples} ({args.compiler}): {counts}, {time.time() - start:.0f} s")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
