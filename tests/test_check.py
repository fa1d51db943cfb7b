"""`python -m flashfuse check MODEL`: tiny models from transformers' configs, explained and checked against eager."""
import json

import pytest

from flashfuse.check import main


@pytest.mark.parametrize("model", ["gpt2", "llama", "bert", "t5"])
def test_check_passes_and_reports(model, capsys):
    assert main([model, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["verdict"].startswith(f"OK: {model}")
    padded = report["cases"][1]
    assert padded["padding"] and padded["sites"] == padded["rewritten"] > 0 and "key_padding" in padded["report"]


def test_check_reads_a_config_folder(tmp_path, capsys):
    import transformers
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    assert main([str(tmp_path)]) == 0
    assert "OK: gpt2" in capsys.readouterr().out


def test_check_names_a_bad_model(capsys):
    assert main(["no-such-model"]) == 2
    assert "MODEL must be a transformers model type" in capsys.readouterr().err


def test_special_token_ids_outside_the_tiny_vocabulary():
    """phi3's config pads with id 32000; the tiny model's 128 tokens must still hold every special id."""
    from flashfuse.check import build, load_config
    config = load_config("phi3")
    ids = [getattr(config, n, None) for n in ("pad_token_id", "bos_token_id", "eos_token_id")]
    assert all(i is None or i < config.vocab_size for i in ids), ids
    model, inputs = build(config)
    assert model(**inputs).last_hidden_state.shape[:2] == inputs["input_ids"].shape


def test_a_model_transformers_cannot_build_is_named(monkeypatch, capsys):
    import flashfuse.check as check

    def fail(config, **kwargs):
        raise TypeError("'NoneType' object is not iterable")
    monkeypatch.setattr(check, "build", fail)
    assert main(["gpt2"]) == 2
    assert "transformers cannot build a gpt2 model from its config: TypeError" in capsys.readouterr().err


def test_an_image_model_gets_images(capsys):
    assert main(["dinov2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["cases"]) == 1 and report["cases"][0]["rewritten"] > 0


def test_a_model_that_reads_audio_is_named(capsys):
    assert main(["wav2vec2"]) == 2
    assert "a wav2vec2 model reads input_values" in capsys.readouterr().err


def test_per_stage_sizes_stay_lists():
    """Swin's num_heads is one value per stage: the tiny sizes leave such fields alone."""
    from flashfuse.check import load_config
    assert isinstance(load_config("swin").num_heads, (list, tuple))


def test_a_model_that_fails_in_eager_is_named(monkeypatch, capsys):
    import flashfuse.check as check

    def fail(model, inputs):
        raise ValueError("no attention layer in the cache")
    monkeypatch.setattr(check, "_run", fail)
    assert main(["gpt2"]) == 2
    assert "fails in eager mode, before flashfuse is involved (tiny sizes; try --full)" in capsys.readouterr().err
