"""Whisper's log-mel front end in torch, matching transformers' WhisperFeatureExtractor on CPU or CUDA."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from engine.audio import SAMPLE_RATE

N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE     # 480000: every clip is padded to one 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH          # 3000
N_FREQS = N_FFT // 2 + 1                    # 201

# Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per factor 6.4).
_LOG_HZ, _LOG_MEL, _MELS_PER_LOG = 1000.0, 15.0, 27.0 / math.log(6.4)


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return torch.where(hz >= _LOG_HZ, _LOG_MEL + torch.log(hz / _LOG_HZ) * _MELS_PER_LOG, hz * 3.0 / 200.0)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return torch.where(mel >= _LOG_MEL, _LOG_HZ * torch.exp((mel - _LOG_MEL) / _MELS_PER_LOG), mel * 200.0 / 3.0)


@functools.lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> torch.Tensor:
    """[n_mels, 201] float32 on the CPU: slaney-scale triangles over 0..8 kHz, each scaled to unit area
    (librosa's / transformers' norm="slaney"). NOTE: cached and shared; do not write into it."""
    f64 = torch.float64     # built in float64 and rounded once, as transformers does
    mels = torch.linspace(0.0, float(_hz_to_mel(torch.tensor(8000.0, dtype=f64))), n_mels + 2, dtype=f64)
    edges_hz = _mel_to_hz(mels)                                             # [n_mels + 2]
    bins_hz = torch.linspace(0.0, SAMPLE_RATE // 2, N_FREQS, dtype=f64)     # [201]
    widths = edges_hz.diff()                                                # [n_mels + 1]
    to_edge = edges_hz[None, :] - bins_hz[:, None]                          # [201, n_mels + 2]
    rising = -to_edge[:, :-2] / widths[:-1]        # from the left edge up to the centre
    falling = to_edge[:, 2:] / widths[1:]          # from the centre down to the right edge
    triangles = torch.clamp(torch.minimum(rising, falling), min=0.0)        # [201, n_mels]
    area_norm = 2.0 / (edges_hz[2:] - edges_hz[:-2])                        # [n_mels]
    return (triangles * area_norm).T.contiguous().to(torch.float32)


@functools.lru_cache(maxsize=16)
def _filters_on(n_mels: int, device: torch.device) -> torch.Tensor:
    return mel_filters(n_mels).to(device)


@functools.lru_cache(maxsize=16)
def _window_on(device: torch.device) -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True, dtype=torch.float32, device=device)


def log_mel_spectrogram(audio: np.ndarray | torch.Tensor, n_mels: int,
                        device: torch.device | None = None) -> torch.Tensor:
    """float32 [N] 16 kHz samples (N <= 480000; zero-padded to 30 s) -> [n_mels, 3000] float32 log-mel features."""
    return log_mel_batch([audio], n_mels, device)[0]


def log_mel_batch(audios: list[np.ndarray | torch.Tensor], n_mels: int,
                  device: torch.device | None = None) -> torch.Tensor:
    """B clips of at most 30 s -> [B, n_mels, 3000] float32, each clip scaled by its own maximum.

    The steps are WhisperFeatureExtractor's: pad to 30 s, STFT (periodic Hann 400, hop 160, centred, reflect
    padding), power, drop the last frame, mel, log10 (floor 1e-10), clamp to 8 below the clip's max, (x + 4) / 4.
    `device` defaults to the first clip's (the CPU for numpy)."""
    assert audios, "log_mel_batch needs at least one clip"
    if device is None:
        device = audios[0].device if isinstance(audios[0], torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    batch = torch.zeros(len(audios), N_SAMPLES, dtype=torch.float32, device=device)
    for row, audio in zip(batch, audios):
        samples = torch.as_tensor(audio, dtype=torch.float32).to(device)
        assert samples.ndim == 1, f"a clip is mono [N] samples, got shape {tuple(samples.shape)}"
        assert samples.numel() <= N_SAMPLES, f"a clip is at most {CHUNK_SECONDS} s, got {samples.numel()} samples"
        row[:samples.numel()] = samples
    spectrum = torch.stft(batch, N_FFT, HOP_LENGTH, window=_window_on(device), center=True,
                          pad_mode="reflect", return_complex=True)             # [B, 201, 3001]
    # NOTE: the last frame (centred on the final sample) is dropped so 30 s gives exactly 3000 frames.
    power = spectrum[..., :-1].abs().square().contiguous()   # contiguous: the matmul's strided path is far slower
    mel = _filters_on(n_mels, device) @ power                                   # [B, n_mels, 3000]
    log_mel = torch.clamp(mel, min=1e-10).log10()
    clip_max = log_mel.amax(dim=(1, 2), keepdim=True)
    log_mel = torch.maximum(log_mel, clip_max - 8.0)
    return (log_mel + 4.0) / 4.0
