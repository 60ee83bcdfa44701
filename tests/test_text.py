import json

import pytest
import torch
from conftest import FIXTURES, load_io
from transformers import AutoTokenizer

from neodragon.models.text import (
    T5EncoderWithProjection,
    T5ProjectionConfig,
    TextEncoderBundle,
    TextEncoding,
    build_word_tokenizer,
    tiny_text_bundle,
)

WORDS = ["a", "cat", "dog", "runs", "fast", "on", "the", "beach"] + [
    "at",
    "sunset",
    "red",
    "car",
    "flying",
    "over",
    "city",
    "night",
]


@pytest.fixture(scope="module")
def bundle() -> TextEncoderBundle:
    return tiny_text_bundle(WORDS, pooled_dims=(8, 16), token_dim=12, max_sequence_length=24)


def _assert_same(a: TextEncoding, b: TextEncoding) -> None:
    torch.testing.assert_close(a.tokens, b.tokens, atol=0, rtol=0)
    torch.testing.assert_close(a.pooled, b.pooled, atol=0, rtol=0)
    assert torch.equal(a.mask, b.mask)


# ---- DT5 ------------------------------------------------------------------------------------------------------


def test_dt5_fixture_parity_and_keys():
    model, info = T5EncoderWithProjection.from_pretrained(FIXTURES / "text_encoder_3", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not model.training  # the projection's Dropout(0.1) must be off
    assert model.config.project_in_dim == 16 and model.config.project_out_dim == 20
    io = load_io("dt5_io.safetensors")
    with torch.no_grad():
        tokens = model(io["input_ids"], io["attention_mask"])[0]
    torch.testing.assert_close(tokens, io["tokens"], atol=1e-4, rtol=0)


def test_dt5_save_load_round_trip(tmp_path):
    model = T5EncoderWithProjection.from_pretrained(FIXTURES / "text_encoder_3")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["out_dim"] == 20 and config["model_type"] == "t5"
    assert config["architectures"] == ["T5EncoderWithProjection"]
    loaded, info = T5EncoderWithProjection.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    io = load_io("dt5_io.safetensors")
    with torch.no_grad():
        a = model(io["input_ids"], io["attention_mask"])[0]
        b = loaded(io["input_ids"], io["attention_mask"])[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_dt5_state_dict_names():
    config = T5ProjectionConfig(
        vocab_size=10, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2, project_in_dim=8, out_dim=6
    )
    keys = set(T5EncoderWithProjection(config).state_dict())
    assert {"encoder.shared.weight", "final_projection.0.weight", "final_projection.3.weight"} <= keys
    assert "encoder.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in keys
    assert not any("bias" in k and "relative_attention_bias" not in k for k in keys)


def test_projection_width_quirk():
    assert T5ProjectionConfig(project_out_dim=7).project_out_dim == 4096
    assert T5ProjectionConfig(out_dim=7, project_out_dim=9).project_out_dim == 7
    assert T5ProjectionConfig().project_in_dim == 768


# ---- tokenizers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_word_tokenizer_offline_round_trip(tmp_path, monkeypatch, kind):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = build_word_tokenizer(WORDS, 10, kind=kind)
    ids = tokenizer("A Cat, runs zebra!")["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if kind == "clip":
        assert pieces[0] == tokenizer.bos_token and tokenizer.pad_token_id == tokenizer.eos_token_id
        assert tokenizer.eos_token_id != 2
        pieces = pieces[1:]
    else:
        assert tokenizer.pad_token_id == 0
    assert pieces == ["a", "cat", ",", "runs", tokenizer.unk_token, "!", tokenizer.eos_token]
    batch = tokenizer(["a cat " * 20, "dog"], padding="max_length", max_length=10, truncation=True)
    assert all(len(row) == 10 for row in batch["input_ids"])
    assert batch["input_ids"][0][-1] == tokenizer.eos_token_id  # eos survives truncation
    assert batch["attention_mask"][1] == [1] * (3 if kind == "clip" else 2) + [0] * (7 if kind == "clip" else 8)

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.model_max_length == 10
    assert reloaded("A Cat, runs zebra!")["input_ids"] == ids
    assert reloaded.pad_token_id == tokenizer.pad_token_id


# ---- bundle -------------------------------------------------------------------------------------------------------


def test_bundle_encode_shapes(bundle):
    enc = bundle.encode(["a cat runs", "a dog on the beach at night"])
    assert enc.tokens.shape == (2, 24, 12) and enc.tokens.dtype == torch.float32
    assert enc.mask.shape == (2, 24) and enc.mask.dtype == torch.long
    assert enc.mask.sum(1).tolist() == [4, 8]  # words + eos
    assert enc.pooled.shape == (2, 24) == (2, bundle.pooled_dim)
    assert bundle.token_dim == 12


def test_bundle_pooling(bundle):
    enc = bundle.encode(["a cat runs", "a red car flying", "a cat runs"])
    torch.testing.assert_close(enc.pooled[0], enc.pooled[2], atol=0, rtol=0)
    assert not torch.allclose(enc.pooled[0], enc.pooled[1], atol=1e-3)
    assert not torch.allclose(enc.tokens[0], enc.tokens[1], atol=1e-3)
    alone = bundle.encode(["a cat runs"])
    torch.testing.assert_close(alone.pooled[0], enc.pooled[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.tokens[0], enc.tokens[0], atol=1e-5, rtol=0)

    # pooled = text_embeds at the first eos: shorter padding gives the same vector
    tokenizer, clip = bundle.pooled_tokenizers[0], bundle.pooled_encoders[0]
    assert clip.config.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():
        short = clip(tokenizer(["a cat runs"], padding="longest", return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(short[0], enc.pooled[0, :8], atol=1e-5, rtol=0)


def test_tiny_bundle_is_seeded():
    a = tiny_text_bundle(WORDS, pooled_dims=(4,), token_dim=6, max_sequence_length=8, seed=3)
    b = tiny_text_bundle(WORDS, pooled_dims=(4,), token_dim=6, max_sequence_length=8, seed=3)
    c = tiny_text_bundle(WORDS, pooled_dims=(4,), token_dim=6, max_sequence_length=8, seed=4)
    _assert_same(a.encode(["a cat"]), b.encode(["a cat"]))
    assert not torch.equal(a.encode(["a cat"]).pooled, c.encode(["a cat"]).pooled)


def test_bundle_save_load_round_trip(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bundle.save_pretrained(tmp_path)
    expected = {"tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3"}
    assert {p.name for p in tmp_path.iterdir()} == expected
    loaded = TextEncoderBundle.from_pretrained(tmp_path)
    assert loaded.max_sequence_length == 24
    prompts = ["a cat runs on the beach", "sunset, city at night!"]
    _assert_same(loaded.encode(prompts), bundle.encode(prompts))

    half = TextEncoderBundle.from_pretrained(tmp_path, torch_dtype=torch.bfloat16, max_sequence_length=16)
    enc = half.encode(prompts)
    assert enc.tokens.dtype == torch.bfloat16 and enc.pooled.dtype == torch.bfloat16
    assert enc.tokens.shape == (2, 16, 12)


def test_bundle_missing_subfolder(bundle, tmp_path):
    bundle.save_pretrained(tmp_path)
    for path in (tmp_path / "text_encoder_2").iterdir():
        path.unlink()
    (tmp_path / "text_encoder_2").rmdir()
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        TextEncoderBundle.from_pretrained(tmp_path)


def test_bundle_needs_a_pooled_encoder(bundle):
    with pytest.raises(ValueError):
        TextEncoderBundle([], (bundle.token_tokenizer, bundle.token_encoder))


def test_bundle_loads_a_plain_t5_encoder_as_its_token_stream(bundle, tmp_path):
    """Pyramid-Flow's SD3 text stack keeps T5-XXL as a plain T5EncoderModel: the teacher of DT5 distillation."""
    from transformers import T5Config, T5EncoderModel

    bundle.save_pretrained(tmp_path)
    dt5 = bundle.token_encoder.config.to_dict()
    plain = T5EncoderModel(T5Config(**{k: v for k, v in dt5.items() if k not in (
        "project_in_dim", "out_dim", "project_out_dim", "architectures", "model_type")}))
    plain.encoder.load_state_dict(bundle.token_encoder.encoder.encoder.state_dict())
    plain.save_pretrained(tmp_path / "text_encoder_3")
    loaded = TextEncoderBundle.from_pretrained(tmp_path)
    assert isinstance(loaded.token_encoder, T5EncoderModel)
    assert loaded.token_dim == bundle.token_encoder.config.d_model
    encoding = loaded.encode(["a cat runs"])
    hidden = bundle.token_encoder.encoder(**{k: v for k, v in bundle.tokenize(["a cat runs"]).items()
                                            if k in ("input_ids", "attention_mask")})[0]
    torch.testing.assert_close(encoding.tokens, hidden)
