"""The engine core for a pooling model (an encoder, or a decoder with a classification head): the process
loop's Core, serving EmbedRequests only (embeddings, a classifier's probabilities, per-token states)."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.embedding import EmbeddingModel
from engine.messages import (AddRequest, EmbedOutput, EmbedRequest, EngineInfo, EngineStats, TokenOutput,
                             TranscribeRequest, TranscriptionOutput)
from engine.model_kinds import is_pooling_model, pooling_facts  # noqa: F401 (callers import them from here too)
from engine.models.sequence_classification import SequenceClassifier
from engine.startup import pick_device, pick_dtype


class PoolingCore:
    """Serves EmbedRequests for a pooling model. It never holds a generation request: clients refuse those
    for a model that does not generate (engine.validation.check_request)."""

    def __init__(self, config: EngineConfig, on_phase: Callable[[str], None] = lambda phase: None):
        start = time.monotonic()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        on_phase("loading weights")
        self.model: EmbeddingModel | SequenceClassifier
        if pooling_facts(config.model)[1]:
            max_len = config.max_model_len if isinstance(config.max_model_len, int) else None
            self.model = SequenceClassifier.from_path(config.model, device, dtype, max_len, config.cpu_kernels)
            labels, vocab_size = self.model.labels, self.model.vocab_size
        else:
            self.model = EmbeddingModel.from_path(config.model, device, dtype)
            labels, vocab_size = (), self.model.model.config.vocab_size
        self.requests: dict = {}   # always empty
        self.info = EngineInfo(
            model_name=config.served_name or config.model, max_model_len=self.model.max_seq_length,
            num_blocks=0, block_size=0, kv_capacity_tokens=0, device=str(device),
            dtype=str(dtype).removeprefix("torch."), eos_token_ids=(), vocab_size=vocab_size,
            is_embedding_model=True, load_seconds=time.monotonic() - start, labels=labels)

    def add_request(self, request: AddRequest) -> list[TokenOutput]:
        raise AssertionError(f"{request.request_id}: a pooling model does not generate text")

    def transcribe(self, request: TranscribeRequest) -> list[TranscriptionOutput]:
        # the server sends audio only to speech models (its capability checks): this is a client bug
        return [TranscriptionOutput(request.request_id, finished=True, finish_reason="error",
                                    error="this model does not transcribe audio")]

    def embed(self, request: EmbedRequest) -> EmbedOutput:
        """Inputs the client has checked (engine.validation.check_inputs); the task fits the model (the
        server's capability checks), so a mismatch is a client bug."""
        model, num_tokens = self.model, sum(len(ids) for ids in request.inputs)
        if request.task == "token_embed":
            if isinstance(model, SequenceClassifier) and model.config.kind == "decoder":
                return EmbedOutput(request.request_id, error="per-token hidden states ('token_embed') are served for "
                                   "encoder models only", error_code="not_supported")
            states = model.token_states(request.inputs, request.token_type_ids) \
                if isinstance(model, SequenceClassifier) else model.token_states(request.inputs)
            return EmbedOutput(request.request_id, token_embeddings=[s.numpy() for s in states], num_tokens=num_tokens)
        if request.task == "classify":
            assert isinstance(model, SequenceClassifier), f"{request.request_id}: not a classifier"
            probs = model.probs(request.inputs, request.token_type_ids)
            return EmbedOutput(request.request_id, probs=probs.numpy(), num_tokens=num_tokens)
        assert request.task == "embed" and isinstance(model, EmbeddingModel), \
            f"{request.request_id}: task {request.task!r} for a {type(model).__name__}"
        return EmbedOutput(request.request_id, embeddings=model.embed(request.inputs).numpy(), num_tokens=num_tokens)

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
