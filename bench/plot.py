"""Plot a bench/kernels.py results file: TFLOP/s by N, one panel per head dim x causal (forward on top,
backward below), one line per implementation.

    python bench/plot.py bench/results/kernels-<date>.json      # writes the .png beside it
"""
import json
import sys


def plot(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if "error" not in r and not r.get("decode") and not r["bias"]
            and r["Hkv"] == r["H"]]
    panels = sorted({(r["D"], r["causal"]) for r in rows})
    if not panels:
        raise ValueError(f"{path} has no grid rows to plot (only GQA, bias, decode or refused rows)")
    impls = sorted({r["impl"] for r in rows}, key=lambda name: (name != "flashfuse", name))
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7), squeeze=False, sharex=True)
    for col, (d, causal) in enumerate(panels):
        for row, what in enumerate(("fwd", "bwd")):
            ax = axes[row][col]
            for impl in impls:
                points = sorted((r["N"], r[f"{what}_tflops"]) for r in rows
                                if r["impl"] == impl and r["D"] == d and r["causal"] == causal
                                and r.get(f"{what}_tflops") is not None)  # FP8 rows have no backward
                if points:
                    ax.plot(*zip(*points), marker="o", label=impl, linewidth=2.5 if impl == "flashfuse" else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{what}, D={d}, {'causal' if causal else 'non-causal'}", fontsize=10)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("TFLOP/s")
            if row == 1:
                ax.set_xlabel("N")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{data['gpu']}, torch {data['torch']}, triton {data['triton']}, bf16, commit {data['commit']}")
    fig.tight_layout()
    out = path.rsplit(".", 1)[0] + ".png"
    fig.savefig(out, dpi=90)
    return out


if __name__ == "__main__":
    print(plot(sys.argv[1]))
