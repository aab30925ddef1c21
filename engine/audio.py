"""Uploaded audio bytes -> float32 mono 16 kHz samples for Whisper, decoded with PyAV (its wheels carry ffmpeg)."""
from __future__ import annotations

import io
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # imported where used: the API process loads this module for AudioError, never ffmpeg for it
    import av
    import numpy as np

SAMPLE_RATE = 16000

# The demuxers an upload may use. NOTE: a whitelist, not a convenience: ffmpeg probes every format it knows, and
# some of them (hls, concat, ...) open other URLs or local files named inside the upload.
_DEMUXERS = "wav,flac,mp3,ogg,matroska,webm,mov,mp4,m4a,aac"
_FORMATS = "readable WAV, FLAC, MP3, OGG, WEBM or M4A"
# Audio may run this far past max_seconds before we refuse it (and is then cut to max_seconds): encoder priming
# and padding (AAC, MP3) make a file a few tens of ms longer than its content, so "60 s" is often 60.05 s.
_PADDING_SLACK_S = 0.25


class AudioError(ValueError):
    """The upload cannot be used as audio; the message names the problem for the user."""


def decode_audio(data: bytes, *, max_seconds: float | None = None) -> np.ndarray:
    """Decode WAV/FLAC/MP3/OGG/WEBM/M4A bytes to float32 [N] mono 16 kHz in [-1, 1].

    Refuses audio longer than max_seconds, from the container's duration when it reports one, else as soon as
    the decoded samples pass it (a file that lies about its duration does not get decoded to the end)."""
    import av
    if not data:
        raise AudioError("the audio file is empty")
    # NOTE: hostile bytes reach ffmpeg here; whatever it raises is the upload's problem, so it becomes AudioError.
    try:
        container = av.open(io.BytesIO(data), mode="r", options={"format_whitelist": _DEMUXERS})
    except Exception:
        raise AudioError(f"could not decode the file as audio: not a {_FORMATS} file") from None
    try:
        with container:
            return _decode(container, max_seconds)
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(f"could not decode the file as audio: {_reason(e)}") from None


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian signed 16-bit mono PCM -> float32 in [-1, 1)."""
    import numpy as np
    if len(data) % 2:
        raise AudioError(f"PCM16 audio must have an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def resample(audio: np.ndarray, from_rate: int) -> np.ndarray:
    """float32 [N] mono at from_rate -> float32 [M] mono at 16 kHz (M = N * 16000 / from_rate, rounded)."""
    import av
    import numpy as np
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    assert audio.ndim == 1, f"resample takes mono [N] audio, got shape {audio.shape}"
    if from_rate == SAMPLE_RATE or audio.size == 0:
        return audio
    frame = av.AudioFrame.from_ndarray(audio[None, :], format="flt", layout="mono")
    frame.sample_rate = from_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    out = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([f.to_ndarray()[0] for f in out])


def _decode(container: av.container.InputContainer, max_seconds: float | None) -> np.ndarray:
    import numpy as np
    if not container.streams.audio:
        raise AudioError("could not decode the file as audio: it has no audio stream")
    stream = container.streams.audio[0]
    reported = _reported_seconds(container, stream)
    if max_seconds is not None and reported is not None and reported > max_seconds + _PADDING_SLACK_S:
        raise AudioError(_too_long(f"{reported:.1f} s", max_seconds))
    max_samples = None if max_seconds is None else int((max_seconds + _PADDING_SLACK_S) * SAMPLE_RATE)

    chunks: list[np.ndarray] = []
    num_samples = 0
    resampler, source = None, None
    for frame in container.decode(stream):
        # A chained OGG or a concatenated MP3 may change rate or layout mid-stream; one resampler takes one setup.
        setup = (frame.format.name, frame.layout.name, frame.sample_rate)
        if setup != source:
            if resampler is not None:
                num_samples += _extend(chunks, resampler.resample(None))
            resampler, source = _resampler(), setup
        num_samples += _extend(chunks, resampler.resample(frame))
        if max_samples is not None and num_samples > max_samples:
            raise AudioError(_too_long(f"over {max_seconds:g} s", max_seconds))
    if resampler is not None:
        _extend(chunks, resampler.resample(None))
    if not chunks:
        raise AudioError("could not decode the file as audio: it has no audio samples")
    audio = np.concatenate(chunks)
    if max_seconds is not None:
        audio = audio[:int(max_seconds * SAMPLE_RATE)]  # NOTE: never longer than max_seconds
    # Lossy codecs overshoot full scale a little; Whisper expects [-1, 1].
    return np.clip(audio, -1.0, 1.0, out=audio)


def _resampler() -> av.AudioResampler:
    import av
    # The layout stays the source's: we downmix by the channels' mean ourselves, because swresample's float
    # downmix does not normalise (stereo -> 0.707 * (L + R), past 1.0 for loud in-phase audio), and its
    # `rematrix_maxval` fix needs a PyAV new enough to pass resampler options.
    return av.AudioResampler(format="fltp", rate=SAMPLE_RATE)


def _extend(chunks: list[np.ndarray], frames: list[av.AudioFrame]) -> int:
    """Append the frames' samples, downmixed to mono, to chunks; returns how many were added."""
    import numpy as np
    new = [f.to_ndarray().mean(axis=0, dtype=np.float32) for f in frames]
    chunks += new
    return sum(c.size for c in new)


def _reported_seconds(container: av.container.InputContainer, stream: av.audio.AudioStream) -> float | None:
    """The duration the file claims, in seconds: the audio stream's, else the container's, else None."""
    import av
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _too_long(length: str, max_seconds: float) -> str:
    return f"audio is {length} long; this server takes at most {max_seconds:g} s (server.max_audio_s)"


def _reason(e: Exception) -> str:
    """A short reason for the user: ffmpeg's own words without the file name and error code around them."""
    reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return reason.strip().rstrip(".")[:200]
