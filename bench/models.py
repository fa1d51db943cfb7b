"""Whole models on a CUDA GPU: flashfuse against stock torch.compile, SDPA, and SDPA + torch.compile.

    python bench/models.py               # GPT-2 124M, Llama-GQA 0.5B, BERT-base; with and without padding
    python bench/models.py --models gpt2-124M --padding yes --variants sdpa_inductor flashfuse

Unmodified Hugging Face models from their configs (flashfuse.testing.models.BENCH, random weights), bf16.
Variants: `inductor` torch.compile of the eager-attention model; `sdpa` the model with
attn_implementation="sdpa" (cuDNN / FlashAttention through SDPA), not compiled; `sdpa_inductor` that model
compiled; `flashfuse` the eager-attention model compiled with backend="flashfuse"; `sdpa_flashfuse` the SDPA
model (transformers' default attention) compiled with backend="flashfuse", its SDPA calls routed to the op.
Padding: a left-padded attention_mask (the first sequence's first third). Inference is one forward under no_grad
in eval mode; a training step is forward + backward of the mean output in train mode (dropout on where the
config has it).

Per row: p20 / p50 / p80 ms (do_bench), GPU kernel ms per step (torch.profiler), host ms per step (until the
call returns, from an idle GPU), peak memory of the training step, and the output's relative distance from
the first variant's at the positions the attention_mask keeps (a padded query's output is whatever its
attention does with no visible key: eager and finite fills average over the keys, SDPA's math path gives 0,
its CUDA kernels differ again; no later position reads it). `--no-timing` prints only the distances.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timing  # noqa: E402

import flashfuse  # noqa: E402,F401  (registers the backend)
from flashfuse.testing import models  # noqa: E402

VARIANTS = {"inductor": ("eager", "inductor"), "sdpa": ("sdpa", None), "sdpa_inductor": ("sdpa", "inductor"),
            "flashfuse": ("eager", "flashfuse"), "sdpa_flashfuse": ("sdpa", "flashfuse")}


def measure(name, variant, padding, timed=True):
    attn, backend = VARIANTS[variant]
    model, inputs = models.build(name, device="cuda", dtype=torch.bfloat16, attn=attn, padding=padding)
    run = torch.compile(model, backend=backend) if backend else model

    def infer():
        with torch.no_grad():
            return models.first_output(run(**inputs))

    def train():
        models.first_output(run(**inputs)).float().mean().backward()

    model.eval()
    out = infer().float()
    keep = inputs.get("attention_mask")
    if keep is not None and keep.shape == out.shape[:2]:  # compare the positions a padded batch keeps
        out = out[keep.bool()]
    if not timed:
        return dict(model=name, variant=variant, padding=padding), out
    i20, i50, i80 = timing.wall_ms(infer)
    row = dict(model=name, variant=variant, padding=padding, infer_ms=i50, infer_ms_p20=i20, infer_ms_p80=i80,
               infer_gpu_ms=timing.gpu_ms(infer, calls=3), infer_host_ms=timing.host_ms(infer, calls=5))
    model.train()
    train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t20, t50, t80 = timing.wall_ms(train)
    peak = torch.cuda.max_memory_allocated() / 2**20
    row.update(train_ms=t50, train_ms_p20=t20, train_ms_p80=t80, train_peak_mib=peak,
               train_gpu_ms=timing.gpu_ms(train, calls=3), train_host_ms=timing.host_ms(train, calls=5))
    model.zero_grad(set_to_none=True)
    return row, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-124M", "llama-gqa-0.5B", "bert-base"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--padding", choices=["no", "yes", "both"], default="both")
    parser.add_argument("--no-timing", action="store_true", help="only each variant's distance from the first")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    paddings = {"no": [False], "yes": [True], "both": [False, True]}[args.padding]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print("| model | padding | variant | inference ms (gpu, host) | training ms (gpu, host) | peak MiB | vs first |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in args.models:
        for padding in paddings:
            first = None
            for variant in args.variants:
                torch._dynamo.reset()
                try:
                    row, out = measure(name, variant, padding, timed=not args.no_timing)
                except Exception as exc:
                    print(f"| {name} | {padding} | {variant} | failed: {type(exc).__name__}: {exc} |", flush=True)
                    continue
                first = out if first is None else first
                row["vs_first"] = ((out - first).norm() / first.norm()).item()
                rows.append(row)
                if args.no_timing:
                    print(f"| {name} | {'yes' if padding else 'no'} | {variant} | | | | {row['vs_first']:.1e} |")
                    continue
                print(f"| {name} | {'yes' if padding else 'no'} | {variant} | {row['infer_ms']:.2f} "
                      f"({row['infer_gpu_ms']:.2f}, {row['infer_host_ms']:.2f}) | {row['train_ms']:.2f} "
                      f"({row['train_gpu_ms']:.2f}, {row['train_host_ms']:.2f}) | {row['train_peak_mib']:.0f} "
                      f"| {row['vs_first']:.1e} |", flush=True)
                torch.cuda.empty_cache()
    if not args.no_timing:
        print(f"saved {timing.save(rows, 'models', args.out)}")


if __name__ == "__main__":
    main()
