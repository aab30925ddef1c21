"""Whisper in our engine against transformers: a randomly initialised checkpoint of tiny's shape, greedy
tokens for 8 random clips decoded together in one SpeechCore, each equal to WhisperForConditionalGeneration
.generate on its own."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.messages import TranscribeRequest
from engine.speech_core import SpeechCore

transformers = pytest.importorskip("transformers")

NUM_NEW_TOKENS = 24
EOT, SOT, NO_TIMESTAMPS = 50256, 50257, 50362


@pytest.fixture(scope="module")
def random_tiny(tmp_path_factory, whisper_tiny_en_path) -> Path:
    """tiny.en's shape with random weights (init_std 0.1: outputs that depend on the audio), saved as an HF
    directory with tiny.en's tokenizer and suppression lists."""
    src = Path(whisper_tiny_en_path)
    suppress = json.loads((src / "config.json").read_text())["suppress_ids"]
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6,
        decoder_layers=4, decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536, init_std=0.1,
        decoder_start_token_id=SOT, bos_token_id=SOT, eos_token_id=EOT, pad_token_id=EOT,
        suppress_tokens=suppress, begin_suppress_tokens=[220, EOT])
    model = transformers.WhisperForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.no_timestamps_token_id, gen.is_multilingual = NO_TIMESTAMPS, False
    gen.suppress_tokens, gen.begin_suppress_tokens = suppress, [220, EOT]
    out = tmp_path_factory.mktemp("whisper-random")
    model.save_pretrained(out)
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    return out


def _clips(num: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    clips = []
    for _ in range(num):
        n = int(rng.integers(8000, 16000 * 25))
        t = np.arange(n) / 16000
        tone = np.sin(2 * np.pi * rng.uniform(100, 3000) * t) * rng.uniform(0.05, 0.8)
        clips.append((tone + rng.standard_normal(n) * rng.uniform(0.001, 0.3)).astype(np.float32))
    return clips


@pytest.fixture(scope="module")
def references(random_tiny) -> tuple[list[np.ndarray], list[tuple[list[int], bool]]]:
    """The clips, and per clip transformers' greedy text tokens (up to NUM_NEW_TOKENS) and whether it ended."""
    model = transformers.WhisperForConditionalGeneration.from_pretrained(random_tiny).eval()
    # NOTE: a generation_config.json saved "from the model config" is rebuilt from it on loading, which
    # forgets Whisper's fields: set them again (our engine reads them from the saved file)
    model.generation_config.no_timestamps_token_id, model.generation_config.is_multilingual = NO_TIMESTAMPS, False
    features = transformers.WhisperFeatureExtractor(feature_size=80)
    clips, refs = _clips(8), []
    for clip in clips:
        feats = torch.from_numpy(features(clip, sampling_rate=16000, return_tensors="np").input_features)
        with torch.no_grad():
            ref = model.generate(feats, max_new_tokens=NUM_NEW_TOKENS, do_sample=False)[0].tolist()
        ref = [t for t in ref if t not in (SOT, NO_TIMESTAMPS)]
        ended = EOT in ref
        refs.append(([t for t in (ref[:ref.index(EOT)] if ended else ref) if t < EOT], ended))
    distinct = {tuple(text[:8]) for text, _ in refs}
    assert len(distinct) >= 6, "the random model's outputs hardly depend on the audio: a weak test"
    return clips, refs


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["c-kernels", "torch-twins"])
def test_greedy_tokens_equal_transformers(random_tiny, references, cpu_kernels):
    """The C decode-attention kernel and the torch twins (the ops the CUDA path mirrors) alike."""
    clips, refs = references
    core = SpeechCore(EngineConfig(model=str(random_tiny), device="cpu", dtype="float32", cpu_kernels=cpu_kernels))
    for i, clip in enumerate(clips):   # all in flight together: they share encoder batches and decode steps
        assert core.transcribe(TranscribeRequest(f"clip-{i}", clip)) == []
    texts: dict[str, list[int]] = {f"clip-{i}": [] for i in range(len(clips))}
    streamed: dict[str, list[int]] = {f"clip-{i}": [] for i in range(len(clips))}
    finished = set()
    while core.has_work():
        for out in core.step():
            assert out.error is None, out.error
            streamed[out.request_id] += out.new_token_ids
            texts[out.request_id] += [t for s in out.segments for t in s.token_ids]
            if out.finished:
                finished.add(out.request_id)
    assert finished == set(texts)
    assert core.block_manager.num_used_blocks == 0
    for i, (ref_text, ended) in enumerate(refs):
        ours = texts[f"clip-{i}"]
        assert streamed[f"clip-{i}"] == ours, "streamed tokens differ from the segments' tokens"
        assert (ours if ended else ours[:len(ref_text)]) == ref_text, f"clip {i}"
