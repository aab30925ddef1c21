"""What the engine core keeps per request between steps: its samples (one Sequence each) and their state."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.messages import AddRequest, TokenLogprob
from engine.sequence import Sequence


@dataclass(slots=True)
class Sample:
    """One sequence the engine runs for a request, and what it keeps for it across steps."""
    request_id: str
    index: int                               # which of the request's samples (0 .. num_samples - 1)
    seq: Sequence
    generator: torch.Generator | None        # seeded requests: seed + index, on the engine's device
    matcher: object | None = None            # structured outputs: this sample's grammar state
    cumulative_logprob: float = 0.0


@dataclass(slots=True)
class RequestState:
    request: AddRequest
    samples: list[Sample]
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)   # per prompt token after the first
    prompt_logprobs_sent: bool = False
    num_finished: int = 0

    @property
    def holds_back(self) -> bool:
        """best_of > n: the samples' tokens are sent only when all finish, the n best of them."""
        params = self.request.params
        return params.best_of is not None and params.best_of > params.n
