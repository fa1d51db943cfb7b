"""`python -m flashfuse demo`: an unmodified GPT-2, compiled with flashfuse, against eager.

Builds GPT-2 from its config (random weights, nothing downloaded) with eager attention, prints the
explain table, checks the compiled model's output against eager, and times both. Each variant runs
in its own process so that its peak memory is its own (peak RSS on the CPU, the allocator's peak
on CUDA). CPU by default, CUDA when present.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = ("eager", "flashfuse")


def build(device):
    """GPT-2 small (124M), batch 8 x 1024, bf16 on CUDA; a 4-layer GPT-2, batch 2 x 512, fp32 on the CPU.
    The first sequence is left-padded."""
    from flashfuse.testing.models import build as build_model
    name, dtype = ("gpt2-124M", torch.bfloat16) if device == "cuda" else ("gpt2-4L-256", torch.float32)
    model, inputs = build_model(name, device=device, dtype=dtype, padding=True)
    return model, inputs, dtype


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(variant, device, repeats):
    """Run one variant in this process: its output, median time and peak memory."""
    model, inputs, _ = build(device)
    if variant == "flashfuse":
        model = torch.compile(model, backend="flashfuse")
    with torch.no_grad():
        out = model(**inputs).last_hidden_state  # warm-up (and compilation)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = _rss_mib()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(**inputs).last_hidden_state
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mib() - base
    times.sort()
    return out, times[len(times) // 2] * 1000, peak


def _child(variant, device, repeats, path):
    out, ms, peak = measure(variant, device, repeats)
    torch.save(out.float().cpu(), path)
    print(json.dumps({"ms": ms, "peak_mib": peak}))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m flashfuse demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.device, args.repeats, args.out)

    import flashfuse
    from flashfuse.tolerances import FORWARD, relative_error
    model, inputs, dtype = build(args.device)
    cfg = model.config
    print(f"GPT-2 ({cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.n_head} heads), batch x seq = "
          f"{tuple(inputs['input_ids'].shape)}, {dtype}, on {args.device}, left padding on the first sequence\n")
    with torch.no_grad():
        print(flashfuse.explain(model, **inputs), "\n")

    results = {}
    with tempfile.TemporaryDirectory(prefix="flashfuse-demo-") as folder:  # private to this run
        for variant in VARIANTS:
            path = os.path.join(folder, f"{variant}.pt")
            cmd = [sys.executable, "-m", "flashfuse", "demo", "--child", variant, "--device", args.device,
                   "--repeats", str(args.repeats), "--out", path]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[variant] = json.loads(line) | {"out": torch.load(path, weights_only=True)}
    err = relative_error(results["flashfuse"]["out"], results["eager"]["out"])
    ok = err < FORWARD[dtype]
    print(f"output vs eager: relative error {err:.2e} ({'OK' if ok else 'MISMATCH'}, tolerance {FORWARD[dtype]:.0e})")
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS growth"
    print(f"\n{'':12}{'median ms':>12}{memory:>20}")
    for variant in VARIANTS:
        r = results[variant]
        print(f"{variant:12}{r['ms']:12.2f}{r['peak_mib']:16.1f} MiB")
    print(f"\nspeed-up {results['eager']['ms'] / results['flashfuse']['ms']:.2f}x")
    return 0 if ok else 1
