"""Tests for export/models.py: the embedded SmolLM2 conversion, local dirs, hub ids, tiny Llama."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from export import models
from export.models import (
    CACHE_MARKER,
    SUPPORTED_ARCHITECTURES,
    LoadedModel,
    convert_gguf,
    default_cache_dir,
    embedded_model_dir,
    load_model,
    load_tokenizer,
    tiny_llama,
)
from shared.errors import InputError


# --- the real SmolLM2 (converted once per session in conftest.py) ---------------------


def test_converted_smollm2_matches_gguf_logits(smollm2_conversion, smollm2: LoadedModel) -> None:
    # prepare: reference logits come from the GGUF-loaded model (conftest)
    ids = smollm2_conversion.prompt_ids
    # execute
    with torch.no_grad():
        cached = smollm2.model(ids).logits[0, -1]
    # assert: the safetensors copy holds the same de-quantised weights
    torch.testing.assert_close(cached, smollm2_conversion.gguf_logits, atol=1e-4, rtol=1e-5)
    assert int(cached.argmax()) == int(smollm2_conversion.gguf_logits.argmax())


def test_converted_cache_is_a_plain_llama_directory(smollm2_conversion) -> None:
    target = embedded_model_dir(smollm2_conversion.cache_dir)
    config = json.loads((target / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config  # else from_pretrained would look for the GGUF again
    assert (target / "model.safetensors").is_file()
    assert (target / CACHE_MARKER).is_file()
    # no temporary directory survives a successful conversion
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_smollm2_is_fp32_eval_cpu_without_kv_cache(smollm2: LoadedModel) -> None:
    assert smollm2.model_id == "smollm2-135m-instruct"
    assert type(smollm2.model).__name__ in SUPPORTED_ARCHITECTURES
    assert not smollm2.model.training
    assert smollm2.model.config.use_cache is False
    assert {p.dtype for p in smollm2.model.parameters()} == {torch.float32}
    assert {p.device.type for p in smollm2.model.parameters()} == {"cpu"}
    assert smollm2.model.config.num_hidden_layers == 30


def test_second_load_reads_the_cache_without_converting(smollm2_conversion) -> None:
    messages: list[str] = []
    load_tokenizer("smollm2", cache_dir=smollm2_conversion.cache_dir, progress=messages.append)
    assert not any("Converting" in m for m in messages)


def test_tokenizer_round_trips_and_verbalizer_words_are_single_tokens(smollm2_tokenizer) -> None:
    texts = ["The film is a delight.", "Naïve, clumsy — and 2 hours long!", "  spaced  out  "]
    for text in texts:
        ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
        assert smollm2_tokenizer.decode(ids) == text
    assert len(smollm2_tokenizer) == 49152
    # reference values: the SmolLM2 vocabulary
    assert smollm2_tokenizer.encode(" great", add_special_tokens=False) == [1109]
    assert smollm2_tokenizer.encode(" terrible", add_special_tokens=False) == [13321]


# --- conversion mechanics, with a tiny model standing in for the GGUF -----------------


@pytest.fixture()
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model: LoadedModel) -> Path:
    """A stand-in .gguf file; from_pretrained hands back the tiny model instead of reading it."""
    import transformers

    gguf = tmp_path / "pkg" / "Fake.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model.model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_model.tokenizer)
    return gguf


def test_interrupted_conversion_leaves_no_cache(fake_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model) -> None:
    # prepare: writing the tokenizer fails half-way through the conversion
    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_model.tokenizer), "save_pretrained", crash)
    out = tmp_path / "cache" / "models" / "fake"
    # execute
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(fake_gguf, out, progress=lambda _m: None)
    # assert: neither the target nor a temporary directory is left
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_incomplete_cache_is_replaced(fake_gguf: Path, tmp_path: Path) -> None:
    # prepare: a directory without the completion marker, as if written by hand
    out = tmp_path / "cache" / "models" / "fake"
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    assert not models._cache_is_valid(out, fake_gguf)
    # execute
    convert_gguf(fake_gguf, out, progress=lambda _m: None)
    # assert
    assert models._cache_is_valid(out, fake_gguf)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_cache_from_another_gguf_is_not_valid(fake_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    convert_gguf(fake_gguf, out, progress=lambda _m: None)
    fake_gguf.write_bytes(b"GGUF a different release")  # the package was upgraded
    assert not models._cache_is_valid(out, fake_gguf)


# --- local directories, hub ids, refusals -------------------------------------------


def test_local_directory_loads_the_same_model(tiny_model: LoadedModel, tmp_path: Path) -> None:
    # prepare
    tiny_model.model.save_pretrained(tmp_path / "tiny")
    tiny_model.tokenizer.save_pretrained(tmp_path / "tiny")
    ids = torch.tensor([[1109, 13321, 42, 7]])
    # execute
    loaded = load_model(str(tmp_path / "tiny"), progress=lambda _m: None)
    # assert
    assert loaded.model_id == str((tmp_path / "tiny").resolve())
    assert not loaded.model.training and loaded.model.config.use_cache is False
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, tiny_model.model(ids).logits)


def test_unsupported_architecture_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(InputError) as err:
        load_model(str(tmp_path / "gpt2"), progress=lambda _m: None)
    assert "GPT2LMHeadModel" in str(err.value)
    assert "LlamaForCausalLM" in str(err.value)


@pytest.mark.parametrize("spec", ["./no/such/model", "/definitely/not/here", "~/nope-deftly-model"])
def test_missing_path_is_an_input_error(spec: str) -> None:
    with pytest.raises(InputError, match="no such directory"):
        load_model(spec, progress=lambda _m: None)


def test_directory_without_config_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no config.json"):
        load_model(str(tmp_path), progress=lambda _m: None)


def test_unreachable_hub_id_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare: the hub client fails as it does without a network (without the retries' wait)
    import transformers

    def offline(*_a, **_k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    # execute / assert
    with pytest.raises(InputError, match="Hugging Face Hub") as err:
        load_model("someone/not-a-model", progress=lambda _m: None)
    assert "someone/not-a-model" in str(err.value)


# --- tiny Llama and the cache location ---------------------------------------------


def test_tiny_llama_shape_and_determinism(smollm2_tokenizer) -> None:
    # prepare
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    # execute
    a = tiny_llama(seed=0, tokenizer=smollm2_tokenizer)
    b = tiny_llama(seed=0, tokenizer=smollm2_tokenizer)
    c = tiny_llama(seed=1, tokenizer=smollm2_tokenizer)
    # assert
    cfg = a.model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (49152, 256, 512)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 4, 2)
    assert a.model.lm_head.weight is a.model.model.embed_tokens.weight  # tied, as SmolLM2
    assert a.model_id == "tiny-llama-L4-H256-seed0"
    assert not a.model.training and cfg.use_cache is False
    wa, wb, wc = (m.model.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert torch.equal(torch.rand(1), expected_next)  # the global RNG stream is untouched


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DEFTLY_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DEFTLY_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "deftly"
