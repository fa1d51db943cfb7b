"""`python -m flashfuse check MODEL`: does flashfuse rewrite this model's attention, and are its answers unchanged?

    python -m flashfuse check gpt2                  # a transformers model type: tiny sizes, random weights
    python -m flashfuse check path/to/config.json   # or a config file, or a folder holding config.json
    python -m flashfuse check llama --full --json   # the config's real sizes; a JSON report on stdout

Builds the model from its config (nothing downloaded) with eager attention, then for a batch without and with a
left-padded attention_mask: `explain` (which sites are rewritten, and why not), and the compiled model
(backend="flashfuse") against eager, output and every parameter's gradient. Prints the tables and a one-line
verdict; the exit status is 1 when an attention site is left alone or a check fails.
"""
import argparse
import inspect
import json
import os
import sys
import time

import torch

from flashfuse.testing.models import first_output, padding_mask

# size fields a tiny model takes, where its config has them (names as the configs spell them)
TINY = {"num_hidden_layers": 2, "num_layers": 2, "num_decoder_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
        "hidden_size": 64, "d_model": 64, "num_attention_heads": 4, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "num_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "d_kv": 16,
        "intermediate_size": 128, "d_ff": 128, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "n_inner": 128,
        "vocab_size": 128, "max_position_embeddings": 128, "num_local_experts": 4, "num_experts_per_tok": 2,
        "rotary_dim": 8}
TINY_IMAGES = {"image_size": 32, "patch_size": 8}  # 16 patches; not for windowed models (Swin's windows need 224)


def load_config(model, full=False):
    """A transformers config from a model type, a config.json, or a folder holding one; tiny unless `full`."""
    import transformers
    if os.path.isdir(model):
        model = os.path.join(model, "config.json")
    if os.path.isfile(model):
        with open(model) as f:
            fields = json.load(f)
        config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    else:
        try:
            config = transformers.AutoConfig.for_model(model)
        except ValueError as exc:
            raise ValueError(f"MODEL must be a transformers model type (gpt2, llama, bert, t5, ...), a config.json "
                             f"or a folder holding one; got {model!r} ({exc})") from None
    if not full:
        for name, value in TINY.items():
            known = name in config.to_dict() or name in getattr(config, "attribute_map", {})
            if known and not isinstance(getattr(config, name, None), (list, tuple)):  # Swin: heads per stage
                setattr(config, name, value)
        if isinstance(getattr(config, "image_size", None), int) and not hasattr(config, "window_size"):
            for name, value in TINY_IMAGES.items():
                setattr(config, name, value)
        _special_tokens_in_vocab(config)
    config._attn_implementation = "eager"
    return config


def _special_tokens_in_vocab(config):
    """Special token ids the tiny vocabulary no longer holds (phi3's pad id is 32000) become 0, 1, 2 (the ids
    `build` never draws), as an embedding's padding_idx must lie inside it."""
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        return
    for index, name in enumerate(("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
                                  "sep_token_id", "cls_token_id", "mask_token_id", "unk_token_id")):
        value = getattr(config, name, None)
        small = min(index, 2)
        if isinstance(value, int) and value >= vocab:
            setattr(config, name, small)
        elif isinstance(value, (list, tuple)) and any(isinstance(v, int) and v >= vocab for v in value):
            setattr(config, name, [v if v < vocab else small for v in value])


def build(config, batch=2, seq=16, padded=False, seed=0):
    """(model in eval mode, inputs): token ids (and decoder ids for encoder-decoders), a left-padded mask; images
    of the config's size for a model that reads pixel_values (CLIP-like models get both)."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed)
    vocab = getattr(config, "vocab_size", 128)
    reads = inspect.signature(model.forward).parameters
    inputs = {}
    if "pixel_values" in reads:
        vision = getattr(config, "vision_config", config)
        size = getattr(vision, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        inputs["pixel_values"] = torch.randn(batch, getattr(vision, "num_channels", 3), size, size, generator=gen)
    if "input_ids" in reads and (model.main_input_name == "input_ids" or "pixel_values" not in inputs):
        vocab = getattr(getattr(config, "text_config", config), "vocab_size", vocab)
        inputs["input_ids"] = torch.randint(3, vocab, (batch, seq), generator=gen)
        if padded:
            inputs["attention_mask"] = padding_mask(batch, seq)
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(3, vocab, (batch, seq - 3), generator=gen)
    return model, inputs


def _run(model, inputs):
    out = first_output(model(**inputs))
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out, params, cotangent, allow_unused=True)


def check_case(config, padded, log):
    """One batch: the explain report, then compiled against eager. Returns a result dict."""
    import flashfuse
    from flashfuse.tolerances import FORWARD, GRADIENT, gradients_error, relative_error
    model, inputs = build(config, padded=padded)
    log("explain")
    report = flashfuse.explain(model, **inputs)
    log("eager")
    expected, expected_grads = _run(model, inputs)
    log("compiled with backend='flashfuse'")
    torch._dynamo.reset()
    actual, actual_grads = _run(torch.compile(model, backend="flashfuse"), inputs)
    out_err, grad_err = relative_error(actual, expected), gradients_error(actual_grads, expected_grads)
    sites = [s for s in report.sites if s.attention]
    left = [s for s in sites if not s.rewritten]
    return {"padding": padded, "report": str(report), "sites": len(sites), "rewritten": len(sites) - len(left),
            "left_alone": [f"{s.node}: {s.reason}" for s in left], "output_error": out_err,
            "gradient_error": grad_err, "outputs_ok": out_err < FORWARD[torch.float32],
            "gradients_ok": grad_err < GRADIENT[torch.float32]}


def _summary(result):
    case = "padded" if result["padding"] else "unpadded"
    if not result["sites"]:
        return (f"{case}: no attention site found (no softmax between a q.kT product and a p.v product; the report "
                f"lists the softmaxes and why each is not attention), output error {result['output_error']:.1e}")
    return (f"{case} {result['rewritten']} of {result['sites']} attention sites rewritten, output error "
            f"{result['output_error']:.1e}, gradient error {result['gradient_error']:.1e}")


def main(argv):
    parser = argparse.ArgumentParser(prog="python -m flashfuse check", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a transformers model type, a config.json, or a folder holding one")
    parser.add_argument("--full", action="store_true", help="the config's real sizes (default: tiny)")
    parser.add_argument("--json", action="store_true", help="print a JSON report instead of the tables")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def log(stage):
        print(f"[{time.perf_counter() - start:6.1f}s] {stage}", file=sys.stderr, flush=True)
    try:
        config = load_config(args.model, args.full)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        model, inputs = build(config)
    except Exception as exc:  # transformers' own failure to build the model: not a flashfuse result
        print(f"error: transformers cannot build a {config.model_type} model from its config: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if model.main_input_name not in inputs:
        print(f"error: check feeds token ids or images, and a {config.model_type} model reads "
              f"{model.main_input_name}: run flashfuse.explain(model, **your_inputs) and "
              "flashfuse.testing.assert_equivalent instead", file=sys.stderr)
        return 2
    paddings = (False, True) if "input_ids" in inputs else (False,)  # images come unpadded
    try:
        _run(model, inputs)
    except Exception as exc:  # the model fails without flashfuse: its tiny config, or transformers itself
        print(f"error: the {config.model_type} model fails in eager mode, before flashfuse is involved"
              f"{'' if args.full else ' (tiny sizes; try --full)'}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    del model, inputs  # each case builds its own (with --full, two models at once would double the memory)
    results = []
    for padded in paddings:
        log(f"{config.model_type}, {'with' if padded else 'without'} a left-padded attention_mask")
        results.append(check_case(config, padded, log))
    ok = all(r["sites"] and not r["left_alone"] and r["outputs_ok"] and r["gradients_ok"] for r in results)
    verdict = f"{'OK' if ok else 'FAILED'}: {config.model_type}: " + "; ".join(_summary(r) for r in results)
    if args.json:
        print(json.dumps({"model": config.model_type, "ok": ok, "verdict": verdict, "cases": results}, indent=1))
    else:
        for r in results:
            print(f"\n{'with' if r['padding'] else 'without'} a padding mask:\n{r['report']}")
        print("\n" + verdict)
    return 0 if ok else 1
