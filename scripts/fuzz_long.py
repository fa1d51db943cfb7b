"""Long fuzz run of the matcher: many random attention programs and near misses, each checked with check_program.

    TRITON_INTERPRET=0 python scripts/fuzz_long.py --examples 10000 --log fuzz.log --summary fuzz.json
    TRITON_INTERPRET=1 python scripts/fuzz_long.py --examples 300 --log fuzz-interp.log --summary fuzz-interp.json
    python scripts/fuzz_long.py --device cuda --examples 1000 --log fuzz-cuda.log --summary fuzz-cuda.json

Runs the `fuzz` Hypothesis profile in chunks of --chunk examples, each chunk with its own seed, so that
one failure (shrunk to a minimal program and written to the log) does not end the run. Progress goes to
--log every --every programs; --summary gets a JSON summary: programs run, how often each choice was
drawn (the spellings covered), and every failure with its minimal program (or, when a time limit stops
the shrinking, the smallest failing program found so far, with "shrunk": false). TRITON_INTERPRET=0 runs the
op's pure-torch reference on the CPU (fast); TRITON_INTERPRET=1 runs the Triton kernels in Triton's
interpreter (slow); --device cuda moves each program to the GPU, where the op runs the compiled Triton
kernels. Keep shapes tiny on a CPU: the defaults are B <= 2, H <= 3, N <= 8, D in {8, 16}.

    python scripts/fuzz_long.py --merge fuzz.json fuzz-interp.json    # markdown summary of several runs
"""
import argparse
import collections
import json
import os
import resource
import sys
import time
import traceback


def merge(paths):
    """Markdown: the summaries of several runs together (programs, failures, and every choice's count)."""
    runs = [json.load(open(p)) for p in paths]
    total = {key: sum(r[key] for r in runs) for key in ("programs_run", "programs_generated", "attention_programs",
                                                       "near_misses", "sites_expected")}
    coverage = collections.defaultdict(collections.Counter)
    for r in runs:
        for name, counts in r["coverage"].items():
            coverage[name].update(counts)
    def where(run):
        device = run["args"].get("device", "cpu")
        return f"{device}, TRITON_INTERPRET={run['triton_interpret']}" if device == "cpu" else device

    described = ", ".join(f"{where(r)}: {r['programs_generated']} programs in {r['seconds'] / 60:.0f} min"
                          for r in runs)
    lines = [f"- runs: {len(runs)} ({described})",
             f"- programs generated: {total['programs_generated']} ({total['attention_programs']} attention, "
             f"{total['near_misses']} near misses; {total['sites_expected']} sites expected to be rewritten); "
             f"programs run, shrinking included: {total['programs_run']}",
             f"- failures: {sum(len(r['failures']) for r in runs)}"]
    # a summary written before interrupted shrinks were recorded: programs rerun, and no failure kept
    lost = [r["args"]["seed"] for r in runs if r["programs_run"] > r["programs_generated"] and not r["failures"]]
    if lost:
        lines.append(f"- runs stopped while shrinking a failure that their summary does not keep (first seeds): "
                     f"{', '.join(map(str, lost))}")
    lines += ["", "| choice | count by option |", "|---|---|"]
    for name in sorted(coverage):
        counts = ", ".join(f"{value}: {n}" for value, n in coverage[name].most_common())
        lines.append(f"| `{name}` | {counts} |")
    for r in runs:
        for f in r["failures"]:
            lines += ["", f"Failure (chunk seed {f['chunk_seed']}): {f['message']}", "```python", f["source"] or "",
                      "```"]
    return "\n".join(lines)


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--merge"]:
        print(merge(sys.argv[2:]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="programs to generate in all")
    parser.add_argument("--chunk", type=int, default=500, help="programs per Hypothesis run (one seed each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first chunk (chunk i uses seed + i)")
    parser.add_argument("--log", default="fuzz.log")
    parser.add_argument("--summary", default="fuzz.json")
    parser.add_argument("--every", type=int, default=100, help="log progress every this many programs")
    parser.add_argument("--max-seq", type=int, default=8)
    parser.add_argument("--max-heads", type=int, default=3)
    parser.add_argument("--head-dims", default="8,16")
    parser.add_argument("--compiler", default=None, help="eager (default) or inductor")
    parser.add_argument("--device", default="cpu", help="where programs run: cpu (default) or cuda (the Triton "
                        "kernels, compiled)")
    parser.add_argument("--include-open-bugs", action="store_true",
                        help="also draw the programs of OPEN_BUGS (by default they are steered around)")
    args = parser.parse_args(argv)

    from hypothesis import given, seed, settings

    from flashfuse.testing.profiles import fuzz_options, load_profile
    from flashfuse.testing.programs import OPEN_BUGS, attention_programs, check_program

    load_profile("fuzz")
    options = fuzz_options(args.compiler)
    strategy = attention_programs(max_heads=args.max_heads, max_seq=args.max_seq,
                                  head_dims=tuple(int(d) for d in args.head_dims.split(",")),
                                  avoid=() if args.include_open_bugs else tuple(OPEN_BUGS))
    stats = {"calls": 0, "generated": 0, "attention": 0, "near_miss": 0, "sites_expected": 0,
             "failures": [], "chunks": 0}
    coverage = collections.defaultdict(collections.Counter)
    start = time.time()
    log = open(args.log, "a", buffering=1)

    def note(text):
        log.write(f"[{time.time() - start:8.1f}s] {text}\n")

    note(f"start: {vars(args)} TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} options={options}")
    state = {"last_failure": None, "shrinking": False, "logged": 0}

    def write_summary():
        elapsed = time.time() - start
        summary = {
            "programs_run": stats["calls"], "programs_generated": stats["generated"],
            "attention_programs": stats["attention"], "near_misses": stats["near_miss"],
            "sites_expected": stats["sites_expected"],
            "chunks": stats["chunks"], "seconds": round(elapsed, 1),
            "triton_interpret": os.environ.get("TRITON_INTERPRET"), "options": options, "args": vars(args),
            "failures": stats["failures"],
            "coverage": {name: dict(sorted(counter.items(), key=lambda kv: -kv[1]))
                         for name, counter in sorted(coverage.items())},
        }
        tmp = args.summary + ".tmp"
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=1, default=str)
        os.replace(tmp, args.summary)

    def count(program):
        stats["calls"] += 1
        if not state["shrinking"]:
            stats["generated"] += 1
            stats["attention" if program.is_attention else "near_miss"] += 1
            stats["sites_expected"] += program.expected_sites
            for name, value in program.choices.items():
                if name not in ("seed", "pads"):
                    coverage[name][str(value)] += 1

    def check(program):
        """Check one program; it counts once it has finished (passed or failed), not when interrupted."""
        try:
            check_program(program if args.device == "cpu" else program.to(args.device), options=options)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            count(program)
            if not state["shrinking"]:  # in the log at once: a run killed while shrinking still shows it
                note(f"failing program, shrinking it: {program.choices}\n{type(exc).__name__}: {exc}")
            state["last_failure"] = (program, exc)
            state["shrinking"] = True
            raise
        else:
            count(program)
        finally:
            if stats["calls"] % args.every == 0 and stats["calls"] != state["logged"]:
                state["logged"] = stats["calls"]
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
                rate = stats["calls"] / (time.time() - start)
                note(f"{stats['calls']} programs run ({stats['generated']} generated, {rate:.2f}/s), "
                     f"{len(stats['failures'])} failures, max RSS {rss} MiB")
                write_summary()

    def record(chunk, chunk_seed, program, exc, shrunk=True):
        message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        stats["failures"].append({"chunk_seed": chunk_seed, "message": message, "shrunk": shrunk,
                                  "choices": program.choices if program else None,
                                  "source": program.source if program else None})
        how = "shrunk to" if shrunk else "interrupted while shrinking; the smallest failing program so far"
        note(f"FAILURE in chunk {chunk} (seed {chunk_seed}), {how}:\n{program!r}\n{message}\n")

    chunk, chunk_seed = 0, args.seed
    try:
        while stats["generated"] < args.examples:
            n = min(args.chunk, args.examples - stats["generated"])
            chunk_seed = args.seed + chunk
            state["last_failure"], state["shrinking"] = None, False

            @seed(chunk_seed)
            @settings(settings.get_profile("fuzz"), max_examples=n, database=None)
            @given(strategy)
            def run(program):
                check(program)

            try:
                run()
            except Exception as exc:  # a failure, shrunk: log it and go on with the next chunk
                record(chunk, chunk_seed, *(state["last_failure"] or (None, exc)))
            state["last_failure"] = None
            stats["chunks"] += 1
            chunk += 1
            write_summary()
    except KeyboardInterrupt:  # a time limit (timeout --signal=INT): the summary keeps every finished program
        note("interrupted")
        if state["last_failure"]:  # a failure found and not yet shrunk is still a failure
            record(chunk, chunk_seed, *state["last_failure"], shrunk=False)
    note(f"done: {stats['calls']} programs run ({stats['generated']} generated), "
         f"{len(stats['failures'])} failures, {time.time() - start:.0f}s")
    write_summary()
    return 1 if stats["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
