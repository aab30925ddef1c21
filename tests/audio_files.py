"""Audio files made in tests: samples encoded with PyAV into each container/codec the server takes."""
from __future__ import annotations

import io

import av
import numpy as np

# (container format, codec, encoder sample format, encoder rate or None for the source's, encoder options)
FORMATS = {
    "wav": ("wav", "pcm_s16le", "s16", None, {}),
    "flac": ("flac", "flac", "s16", None, {}),
    "mp3": ("mp3", "libmp3lame", "fltp", None, {}),
    "ogg-vorbis": ("ogg", "vorbis", "fltp", None, {"strict": "experimental"}),   # ffmpeg's own, experimental
    "ogg-opus": ("ogg", "libopus", "flt", 48000, {}),
    "webm-opus": ("webm", "libopus", "flt", 48000, {}),
    "m4a-aac": ("ipod", "aac", "fltp", None, {}),     # "ipod" is ffmpeg's M4A muxer
}


def encode(samples: np.ndarray, rate: int, name: str) -> bytes:
    """samples [channels, N] float32 at rate -> the bytes of a file in FORMATS[name]."""
    fmt, codec, sample_fmt, codec_rate, options = FORMATS[name]
    if codec == "vorbis" and samples.shape[0] == 1:
        samples = np.concatenate([samples, samples])     # ffmpeg's vorbis encoder takes stereo only
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=codec_rate or rate, layout=layout, options=options)
        stream.codec_context.format = sample_fmt
        resampler = av.AudioResampler(format=sample_fmt, layout=layout, rate=codec_rate or rate,
                                      frame_size=stream.codec_context.frame_size or 1024)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp", layout=layout)
        frame.sample_rate = rate
        for piece in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(piece))
        out.mux(stream.encode(None))
    return buf.getvalue()
