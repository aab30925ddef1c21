"""Our log-mel features and filterbank against transformers' WhisperFeatureExtractor (the reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from engine.audio import SAMPLE_RATE
from engine.mel import N_FRAMES, N_SAMPLES, log_mel_batch, log_mel_spectrogram, mel_filters

N_MELS = (80, 128)   # Whisper v1-v2 and large-v3


@pytest.fixture(scope="module", params=N_MELS)
def extractor(request: pytest.FixtureRequest) -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=request.param)


def reference(extractor: WhisperFeatureExtractor, audio: np.ndarray) -> np.ndarray:
    return extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]


def clips() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(10 * SAMPLE_RATE) / SAMPLE_RATE
    return {
        "noise": (0.1 * rng.standard_normal(7 * SAMPLE_RATE)).astype(np.float32),
        "sine": (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32),
        "silence": np.zeros(5 * SAMPLE_RATE, np.float32),
        "short": rng.uniform(-1, 1, int(0.3 * SAMPLE_RATE)).astype(np.float32),
        "exactly_30s": (0.3 * rng.standard_normal(N_SAMPLES)).astype(np.float32),
    }


@pytest.mark.parametrize("n_mels", N_MELS)
def test_filterbank_matches(n_mels: int) -> None:
    expected = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                               max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    ours = mel_filters(n_mels)
    assert ours.shape == (n_mels, 201) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected.T, rtol=0, atol=1e-6)
    assert mel_filters(n_mels) is ours      # cached


@pytest.mark.parametrize("name", list(clips()))
def test_features_match(extractor: WhisperFeatureExtractor, name: str) -> None:
    audio = clips()[name]
    ours = log_mel_spectrogram(audio, extractor.feature_size)
    assert ours.shape == (extractor.feature_size, N_FRAMES) and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), reference(extractor, audio), rtol=0, atol=1e-4)


def test_tensor_input_matches_numpy(extractor: WhisperFeatureExtractor) -> None:
    audio = clips()["noise"]
    np.testing.assert_array_equal(log_mel_spectrogram(torch.from_numpy(audio), extractor.feature_size).numpy(),
                                  log_mel_spectrogram(audio, extractor.feature_size).numpy())


def test_batch_normalises_each_clip(extractor: WhisperFeatureExtractor) -> None:
    """Four clips of random length and level in one batch: each equals its own single-clip reference."""
    rng = np.random.default_rng(1)
    audios = [(rng.uniform(0.01, 1.0) * rng.standard_normal(int(rng.integers(1, N_SAMPLES)))).astype(np.float32)
              for _ in range(4)]
    ours = log_mel_batch(audios, extractor.feature_size, torch.device("cpu"))
    assert ours.shape == (4, extractor.feature_size, N_FRAMES)
    expected = extractor(audios, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-4)
    for row, audio in zip(ours, audios):
        np.testing.assert_allclose(row.numpy(), reference(extractor, audio), rtol=0, atol=1e-4)


def test_longer_than_30s_is_refused() -> None:
    with pytest.raises(AssertionError, match="at most 30 s"):
        log_mel_spectrogram(np.zeros(N_SAMPLES + 1, np.float32), 80)


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    audio = clips()["noise"]
    cpu = log_mel_spectrogram(audio, 128)
    cuda = log_mel_spectrogram(audio, 128, torch.device("cuda"))
    assert cuda.device.type == "cuda"
    np.testing.assert_allclose(cuda.cpu().numpy(), cpu.numpy(), rtol=0, atol=1e-4)
