"""decode_audio over every container/codec we accept (encoded here with PyAV), its errors, and the PCM16 helpers."""
from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest

import engine.audio as audio_module
from engine.audio import SAMPLE_RATE, AudioError, decode_audio, pcm16_to_float, resample
from tests.audio_files import FORMATS, encode

def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """float32 [channels, N]: a sine at 0.5 full scale (the right channel at a quarter of the left's level)."""
    t = np.arange(int(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x * (1.0 if c == 0 else 0.25) for c in range(channels)])


def peak_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.argmax(spectrum) * SAMPLE_RATE / audio.size)


def best_correlation(audio: np.ndarray, reference: np.ndarray) -> float:
    """Normalised correlation at the best lag within ±0.1 s (codecs delay or pad the start)."""
    at = int(0.3 * SAMPLE_RATE)
    mid = audio[at: at + SAMPLE_RATE]    # 1 s away from the edges (clips here are at least 1.5 s)
    best = 0.0
    for lag in range(-1600, 1601):
        start = at + lag
        ref = reference[start: start + mid.size]
        best = max(best, float(mid @ ref / (np.linalg.norm(mid) * np.linalg.norm(ref) + 1e-12)))
    return best


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("rate,channels", [(16000, 1), (44100, 2)])
def test_decodes_each_format(name: str, rate: int, channels: int) -> None:
    audio = decode_audio(encode(tone(2.0, rate, channels), rate, name))
    assert audio.dtype == np.float32 and audio.ndim == 1
    # AAC at 16 kHz may keep its 1024 priming samples and pad the last 64 ms frame: up to 0.128 s more.
    assert abs(audio.size / SAMPLE_RATE - 2.0) <= 0.15, audio.size
    assert np.abs(audio).max() <= 1.0
    assert abs(peak_hz(audio) - 440.0) < 2.0
    assert best_correlation(audio, tone(2.0, SAMPLE_RATE)[0]) > 0.95
    if name in ("wav", "flac"):     # lossless: the level survives; stereo is the channels' mean, not their sum
        expected = 0.5 if channels == 1 else 0.5 * (1 + 0.25) / 2
        assert abs(np.abs(audio[1000:-1000]).max() - expected) < 0.01


def test_empty() -> None:
    with pytest.raises(AudioError, match="the audio file is empty"):
        decode_audio(b"")


@pytest.mark.parametrize("data", [np.random.default_rng(0).bytes(20000),
                                  b"Hello, this is a text file and not audio at all.\n" * 50,
                                  b"ffconcat version 1.0\nfile 'secret.wav'\n"])
def test_not_audio(data: bytes) -> None:
    """Random bytes, text, and a playlist naming another file (ffmpeg's concat demuxer would open it)."""
    with pytest.raises(AudioError, match="could not decode the file as audio: not a readable WAV, FLAC, MP3, OGG, "
                                         "WEBM or M4A file"):
        decode_audio(data)


def test_no_audio_stream() -> None:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(AudioError, match="no audio stream"):
        decode_audio(buf.getvalue())


@pytest.mark.parametrize("name", ["wav", "mp3"])
def test_too_long_names_both_durations(name: str) -> None:
    data = encode(tone(5.0, SAMPLE_RATE), SAMPLE_RATE, name)
    expected = r"audio is 5\.\d s long; this server takes at most 2 s \(server\.max_audio_s\)"
    with pytest.raises(AudioError, match=expected):
        decode_audio(data, max_seconds=2)
    assert decode_audio(data, max_seconds=6).size == pytest.approx(5 * SAMPLE_RATE, abs=1600)
    assert decode_audio(data, max_seconds=4.9).size == int(4.9 * SAMPLE_RATE)     # within the slack: cut to fit


def test_lying_duration_stops_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """A WebM whose header claims 0.5 s but whose data runs 5 s: refused once the decoded samples pass the limit,
    without decoding the rest."""
    data = bytearray(encode(tone(5.0, 48000), 48000, "webm-opus"))
    at = data.index(bytes.fromhex("4489 88"))          # Matroska Duration: id 0x4489, 8-byte float, in ms
    data[at + 3: at + 11] = struct.pack(">d", 500.0)
    assert decode_audio(bytes(data)).size == pytest.approx(5 * SAMPLE_RATE, abs=1600)   # no limit: all 5 s
    decoded: list[int] = []
    extend = audio_module._extend

    def counting_extend(chunks: list[np.ndarray], frames: list[av.AudioFrame]) -> int:
        decoded.append(extend(chunks, frames))
        return decoded[-1]

    monkeypatch.setattr(audio_module, "_extend", counting_extend)
    with pytest.raises(AudioError, match=r"audio is over 2 s long; this server takes at most 2 s"):
        decode_audio(bytes(data), max_seconds=2)
    assert 2.0 * SAMPLE_RATE < sum(decoded) < 2.5 * SAMPLE_RATE     # decoding stopped just past the limit


@pytest.mark.parametrize("name", ["mp3", "flac", "m4a-aac", "ogg-opus"])
@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9])
def test_truncated_decodes_or_refuses(name: str, keep: float) -> None:
    data = encode(tone(2.0, 44100, 2), 44100, name)
    try:
        audio = decode_audio(data[: int(len(data) * keep)])
    except AudioError:
        return
    assert audio.dtype == np.float32 and audio.size <= 2.1 * SAMPLE_RATE


def test_garbage_in_the_middle_never_escapes() -> None:
    rng = np.random.default_rng(1)
    for name in ("mp3", "flac", "ogg-vorbis", "webm-opus"):
        data = bytearray(encode(tone(1.0, 44100, 2), 44100, name))
        for _ in range(5):
            at = int(rng.integers(0, len(data) - 64))
            data[at: at + 64] = rng.bytes(64)
            try:
                decode_audio(bytes(data))
            except AudioError:
                pass


def test_pcm16_round_trip() -> None:
    ints = np.array([0, 1, -1, 16384, -16384, 32767, -32768], dtype="<i2")
    audio = pcm16_to_float(ints.tobytes())
    assert audio.dtype == np.float32
    np.testing.assert_array_equal(audio, ints.astype(np.float32) / 32768.0)
    np.testing.assert_array_equal(np.round(audio * 32768).astype("<i2"), ints)
    assert pcm16_to_float(b"").size == 0
    with pytest.raises(AudioError, match="even number of bytes"):
        pcm16_to_float(b"\x00\x01\x02")


def test_resample_24k_to_16k() -> None:
    audio = tone(1.5, 24000)[0]
    out = resample(audio, 24000)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.size - 24000) <= 16, out.size
    assert abs(peak_hz(out) - 440.0) < 2.0
    assert best_correlation(out, tone(1.5, SAMPLE_RATE)[0]) > 0.99
    np.testing.assert_array_equal(resample(audio, SAMPLE_RATE), audio)
