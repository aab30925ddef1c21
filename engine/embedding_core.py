"""The engine core for an encoder (embedding-only) model: the process loop's Core, serving embeddings only."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.embedding import EmbeddingModel, embed_request
from engine.messages import AddRequest, EmbedOutput, EmbedRequest, EngineInfo, EngineStats, TokenOutput
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
    """Serves /v1/embeddings for a sentence-transformers encoder. It never holds a generation request:
    clients refuse those for an embedding model (engine.validation.check_request)."""

    def __init__(self, config: EngineConfig, on_phase: Callable[[str], None] = lambda phase: None):
        start = time.monotonic()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        on_phase("loading weights")
        self.model = EmbeddingModel.from_path(config.model, device, dtype)
        self.requests: dict = {}   # always empty
        self.info = EngineInfo(
            model_name=config.served_name or config.model, max_model_len=self.model.max_seq_length,
            num_blocks=0, block_size=0, kv_capacity_tokens=0, device=str(device),
            dtype=str(dtype).removeprefix("torch."), eos_token_ids=(), vocab_size=self.model.model.config.vocab_size,
            is_embedding_model=True, load_seconds=time.monotonic() - start)

    def add_request(self, request: AddRequest) -> list[TokenOutput]:
        raise AssertionError(f"{request.request_id}: an embedding model does not generate text")

    def embed(self, request: EmbedRequest) -> EmbedOutput:
        return embed_request(self.model.embed, request)

    def abort(self, request_ids: list[str]) -> list[TokenOutput]:
        return []

    def stop_sample(self, request_id: str, index: int) -> list[TokenOutput]:
        return []

    def fail_all(self, message: str) -> list[TokenOutput]:
        return []

    def has_work(self) -> bool:
        return False

    def step(self) -> list[TokenOutput]:
        return []

    def stats(self) -> EngineStats:
        return EngineStats()
