"""The engine core for an encoder (embedding-only) model, with EngineCore's surface for the process loop."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.embedding import EmbeddingModel, embed_request
from engine.messages import EmbedOutput, EmbedRequest, EngineInfo, EngineRequest, EngineStats, TokenOutput
from engine.startup import pick_device, pick_dtype

ENCODER_MODEL_TYPES = ("bert",)


def is_encoder_model(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in ENCODER_MODEL_TYPES
    except (json.JSONDecodeError, OSError):
        return False


class EmbeddingCore:
    """Serves /v1/embeddings for a sentence-transformers encoder; generation requests are refused."""

    def __init__(self, config: EngineConfig, on_phase: Callable[[str], None] = lambda phase: None):
        start = time.monotonic()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        on_phase("loading weights")
        self.model = EmbeddingModel.from_path(config.model, device, dtype)
        self.requests: dict = {}
        self.info = EngineInfo(
            model_name=config.served_name or config.model, max_model_len=self.model.max_seq_length,
            num_blocks=0, block_size=0, kv_capacity_tokens=0, device=str(device),
            dtype=str(dtype).removeprefix("torch."), eos_token_ids=(), vocab_size=self.model.model.config.vocab_size,
            is_embedding_model=True, load_seconds=time.monotonic() - start)

    def add_request(self, request: EngineRequest) -> list[TokenOutput]:
        return [TokenOutput(request.request_id, i, [], finish_reason="error",
                            error="this is an embedding model: it does not generate text")
                for i in range(request.params.n)]

    def embed(self, request: EmbedRequest) -> EmbedOutput:
        return embed_request(self.model.embed, request)

    def abort(self, request_ids: list[str]) -> list[TokenOutput]:
        return []

    def fail_all(self, message: str) -> list[TokenOutput]:
        return []

    def has_work(self) -> bool:
        return False

    def step(self) -> list[TokenOutput]:
        return []

    def stats(self) -> EngineStats:
        return EngineStats()
