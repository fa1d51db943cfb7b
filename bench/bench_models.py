"""Whole models on a GPU: eager, stock torch.compile, SDPA + torch.compile, and flashfuse.

    python bench/bench_models.py [--models gpt2-124M llama-gqa-0.5B bert-base] [--padding-mask] [--profile]

Unmodified Hugging Face models from their configs (random weights), bf16. Inference is one forward
under no_grad in eval mode; a training step is forward + backward of the mean output in train mode
(dropout on where the config has it). Median ms of
triton.testing.do_bench; peak memory of the training step. Shapes as in shared/baselines. --profile also
prints each variant's top GPU kernels in inference (torch.profiler, 5 calls).
"""
import argparse

import torch
import transformers as T
from triton.testing import do_bench

import flashfuse  # noqa: F401  (registers the backend)

MODELS = {
    "gpt2-124M": (lambda impl: T.GPT2Model(T.GPT2Config(attn_implementation=impl)), 8, 1024),
    "llama-gqa-0.5B": (lambda impl: T.LlamaModel(T.LlamaConfig(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=32000, attn_implementation=impl)), 4, 2048),
    "bert-base": (lambda impl: T.BertModel(T.BertConfig(attn_implementation=impl)), 16, 512),
}
# label: (attention implementation, how to compile)
VARIANTS = {"eager": ("eager", None), "inductor": ("eager", "inductor"), "sdpa+inductor": ("sdpa", "inductor"),
            "flashfuse": ("eager", "flashfuse")}


def profile(fn, top=8):
    """The `top` GPU kernels of 5 calls of fn, by total time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="device_time_total", row_limit=top, max_name_column_width=70)


def bench(name, label, padding_mask, show_profile=False):
    build, batch, seq = MODELS[name]
    impl, backend = VARIANTS[label]
    torch.manual_seed(0)
    model = build(impl).cuda().to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if padding_mask else {"input_ids": ids}
    run = torch.compile(model, backend=backend) if backend else model

    def infer():
        with torch.no_grad():
            return run(**inputs).last_hidden_state

    def train():
        run(**inputs).last_hidden_state.float().mean().backward()

    model.eval()  # inference without dropout; the training step with it (GPT-2 and BERT drop 10%)
    out = infer()
    infer_ms = do_bench(infer, return_mode="median")
    if show_profile:
        print(f"{name} {label}, inference:\n{profile(infer)}", flush=True)
    model.train()
    train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    train_ms = do_bench(train, return_mode="median")
    peak = torch.cuda.max_memory_allocated() / 2**20
    return out.float(), infer_ms, train_ms, peak


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--padding-mask", action="store_true",
                        help="pass an attention_mask (of ones): the model then builds a padding-aware mask")
    parser.add_argument("--profile", action="store_true", help="print each variant's top GPU kernels in inference")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {T.__version__}, bf16, "
          f"{'with' if args.padding_mask else 'without'} an attention_mask")
    print("| model | variant | inference ms | training step ms | training peak MiB | output vs first variant |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        reference = None
        for label in args.variants:
            torch._dynamo.reset()
            out, infer_ms, train_ms, peak = bench(name, label, args.padding_mask, args.profile)
            reference = out if reference is None else reference
            err = ((out - reference).norm() / reference.norm()).item()
            print(f"| {name} | {label} | {infer_ms:.2f} | {train_ms:.2f} | {peak:.0f} | {err:.1e} |", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
