"""The state of one transcription request, and of the 30 s window of it being decoded."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.messages import TranscribeRequest
from engine.sequence import Sequence
from engine.whisper_decoding import WindowSegment

NO_SPEECH_THRESHOLD = 0.6     # with avg logprob under LOGPROB_THRESHOLD: a silent window, its text dropped
LOGPROB_THRESHOLD = -1.0      # (OpenAI's transcribe defaults)
SAMPLE_RATE = 16000


@dataclass(slots=True, eq=False)
class Transcription:
    request: TranscribeRequest
    audio: np.ndarray                    # float32 16 kHz mono
    num_frames: int                      # mel frames (10 ms each) in the clip
    language: str | None                 # None until detected
    generator: torch.Generator | None    # seeded requests sample from their own
    previous: list[int]                  # the next window's previous-text prompt: the user's, first window only
    seek: int = 0                        # the next window's first mel frame
    num_tokens: int = 0
    num_segments: int = 0

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass(slots=True, eq=False)
class Window:
    job: Transcription
    seq: Sequence                        # the decoder's tokens (prompt, then sampled), in the paged KV cache
    cross: list[tuple[torch.Tensor, torch.Tensor]]   # per decoder layer, cross-attention (k, v) [h, 1500, D]
    sot_index: int                       # position of <|startoftranscript|> in seq
    time_offset: float                   # seconds: where the window starts in the clip
    num_frames: int                      # mel frames of audio in it (3000 but for the clip's last window)
    sampled: list[int] = field(default_factory=list)
    sum_logprob: float = 0.0
    no_speech_prob: float = 0.0          # read at <|startoftranscript|>, in the window's first pass
    closed: list[WindowSegment] = field(default_factory=list)   # segments sent as they closed

    @property
    def held(self) -> bool:
        """Text of a maybe-silent window is sent only once the window ends and is known not to be silence."""
        return self.no_speech_prob > NO_SPEECH_THRESHOLD

    @property
    def avg_logprob(self) -> float:
        return self.sum_logprob / max(1, len(self.sampled))

    @property
    def is_silent(self) -> bool:
        return self.held and self.avg_logprob < LOGPROB_THRESHOLD
