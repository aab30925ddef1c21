"""Sequence classifiers (cross-encoders, label classifiers): an encoder or one of our decoders, then a head
over one token's final hidden state. BERT: its pooler (dense + tanh) on [CLS], then `classifier`; XLM-R /
RoBERTa: `classifier.dense` + tanh + `classifier.out_proj` on <s>; Llama / Qwen2: `score` (no bias) on the
last non-pad token."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.config import DEFAULT_MAX_NUM_BATCHED_TOKENS
from engine.embedding import decoder_embed, encoder_token_states, padded_batches
from engine.loader import LoadError, ModelFiles, iter_weights, load_config, load_model, materialize, safetensors_files
from engine.model_kinds import SEQUENCE_CLASSIFIERS, classifier_architecture, config_labels
from engine.models.bert import BertConfig, BertModel
from engine.validation import check_inputs

# SEQUENCE_CLASSIFIERS (engine/model_kinds.py): HF class -> how its head reads the backbone: 'bert' | 'roberta'
# (first token) or 'decoder' (last token).
# Checkpoint names of each kind's head: ours -> theirs.
_HEAD_TENSORS = {
    "bert": {"dense.weight": "bert.pooler.dense.weight", "dense.bias": "bert.pooler.dense.bias",
             "out.weight": "classifier.weight", "out.bias": "classifier.bias"},
    "roberta": {"dense.weight": "classifier.dense.weight", "dense.bias": "classifier.dense.bias",
                "out.weight": "classifier.out_proj.weight", "out.bias": "classifier.out_proj.bias"},
    "decoder": {"out.weight": "score.weight"},
}
ACTIVATIONS = ("sigmoid", "softmax", "identity")


@dataclass(frozen=True, slots=True)
class ClassifierConfig:
    """What the head needs beyond the backbone's config, from config.json."""
    kind: str                        # 'bert' | 'roberta' | 'decoder'
    labels: tuple[str, ...]          # id2label in id order
    activation: str                  # logits -> probabilities: one of ACTIVATIONS
    pad_token_id: int | None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str) -> "ClassifierConfig":
        arch = classifier_architecture(raw)
        if arch is None:
            raise ValueError(f"{source}: not a sequence classifier (supported: {', '.join(SEQUENCE_CLASSIFIERS)})")
        labels = config_labels(raw)
        if not labels:
            raise ValueError(f"{source}: a classifier needs at least one label (num_labels / id2label)")
        pad = raw.get("pad_token_id")
        return cls(SEQUENCE_CLASSIFIERS[arch], labels, _activation(raw, len(labels), source),
                   pad if isinstance(pad, int) else None)


def _activation(raw: dict[str, Any], num_labels: int, source: str) -> str:
    """sentence-transformers' CrossEncoder: the activation its config names, else sigmoid for one label;
    several labels: softmax (vLLM's /classify probabilities)."""
    named = (raw.get("sentence_transformers") or {}).get("activation_fn") \
        or raw.get("sbert_ce_default_activation_function")
    if named is None:
        return "sigmoid" if num_labels == 1 else "softmax"
    kind = str(named).rpartition(".")[2].lower()
    if kind not in ACTIVATIONS:
        raise ValueError(f"{source}: unsupported activation {named!r} (supported: Sigmoid, Softmax, Identity)")
    return kind


def activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "softmax":
        return torch.softmax(logits, dim=-1)
    return logits


class ClassificationHead(nn.Module):
    """[B, H] -> [B, num_labels]: dense + tanh first for the encoders, one linear layer for decoders."""

    def __init__(self, hidden_size: int, num_labels: int, kind: str):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size) if kind != "decoder" else None
        self.out = nn.Linear(hidden_size, num_labels, bias=kind != "decoder")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            x = torch.tanh(self.dense(x))
        return self.out(x)

    def load(self, files: ModelFiles, kind: str, dtype: torch.dtype) -> None:
        """Read only the head's tensors from the checkpoint (the backbone loader skips them)."""
        names = _HEAD_TENSORS[kind]
        found = _read_tensors(files, set(names.values()), dtype)
        params = dict(self.named_parameters())
        for ours, theirs in names.items():
            if theirs not in found:
                raise LoadError(f"{files.path}: checkpoint lacks the classifier head's {theirs}")
            if tuple(found[theirs].shape) != tuple(params[ours].shape):
                raise LoadError(f"{files.path}: tensor {theirs} has shape {tuple(found[theirs].shape)}, "
                                f"the config implies {tuple(params[ours].shape)}")
            params[ours].data.copy_(found[theirs])


def _read_tensors(files: ModelFiles, names: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    found: dict[str, torch.Tensor] = {}
    for shard in safetensors_files(files.path):
        with safe_open(str(shard), framework="pt") as f:
            for name in names & set(f.keys()):
                found[name] = f.get_tensor(name).to(dtype)
    return found


class SequenceClassifier:
    """Token id lists (a pair's special tokens and token types included) -> logits / probabilities."""

    def __init__(self, backbone: nn.Module, head: ClassificationHead, config: ClassifierConfig,
                 max_seq_length: int, max_batch_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS):
        self.backbone, self.head, self.config = backbone, head, config
        self.max_seq_length = max_seq_length
        self.max_batch_tokens = max_batch_tokens
        self.device = next(backbone.parameters()).device

    @classmethod
    def from_path(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  max_model_len: int | None = None, cpu_kernels: bool = False) -> "SequenceClassifier":
        files = ModelFiles.at(path)
        if files.format != "hf":
            raise LoadError(f"{path}: classifiers load from a HF directory, not a GGUF file")
        raw = _read_config(files.path / "config.json")
        config = ClassifierConfig.from_dict(raw, str(files.path / "config.json"))
        device = torch.device(device)
        if config.kind == "decoder":
            # NOTE: built as if tied, so no LM head is made: a classifier's checkpoint has `score` instead.
            decoder_config = replace(load_config(files), tie_word_embeddings=True)
            limit = decoder_config.max_position_embeddings
            max_len = min(max_model_len, limit) if max_model_len else limit
            backbone = load_model(files, decoder_config, dtype, device, max_positions=max_len, cpu_kernels=cpu_kernels)
            hidden = decoder_config.hidden_size
        else:
            bert_config = BertConfig.from_dict(raw, str(files.path / "config.json"))
            with torch.device("meta"):
                backbone = BertModel(bert_config)
            backbone = materialize(backbone, dtype, device)
            backbone.load_weights(iter_weights(files, dtype), str(files.path))
            tok_max = _tokenizer_max_length(files.path)
            max_len = min(x for x in (bert_config.max_seq_length, tok_max, max_model_len) if x)
            hidden = bert_config.hidden_size
        head = ClassificationHead(hidden, len(config.labels), config.kind).to(device=device, dtype=dtype)
        head.load(files, config.kind, dtype)
        return cls(backbone.eval(), head.eval(), config, max_len)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.config.labels

    @property
    def vocab_size(self) -> int:
        return self.backbone.config.vocab_size

    @torch.inference_mode()
    def logits(self, token_id_lists: Sequence[Sequence[int]],
               token_type_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """-> [B, num_labels] float32 on the CPU, input order."""
        check_inputs(token_id_lists, self.vocab_size, self.max_seq_length)
        if self.config.kind == "decoder":
            return self._decoder_logits(token_id_lists)
        out = torch.empty(len(token_id_lists), len(self.labels))
        for group, ids, mask, types in padded_batches(token_id_lists, self.backbone.config.pad_token_id,
                                                      self.max_batch_tokens, self.device, token_type_ids):
            hidden = self.backbone(ids, mask, types)
            out[group] = self.head(hidden[:, 0]).float().cpu()
        return out

    def _decoder_logits(self, token_id_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        # NOTE: causal attention: the state at position p is the same with or without the tokens after
        # it, so cutting each input after its last non-pad token pools exactly where HF does.
        cut = [list(ids[: self._last_non_pad(ids) + 1]) for ids in token_id_lists]
        hidden = decoder_embed(self.backbone, cut, "last", normalize=False, max_batch_tokens=self.max_batch_tokens)
        return self.head(hidden.to(self.device, self.head.out.weight.dtype)).float().cpu()

    def _last_non_pad(self, ids: Sequence[int]) -> int:
        """HF's rule: the rightmost token that is not pad_token_id (0 if all are; the last one with no pad id)."""
        pad = self.config.pad_token_id
        if pad is None:
            return len(ids) - 1
        return next((i for i in range(len(ids) - 1, -1, -1) if ids[i] != pad), 0)

    def probs(self, token_id_lists: Sequence[Sequence[int]],
              token_type_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """logits through the model's activation (sigmoid for one label, softmax for several)."""
        return activate(self.logits(token_id_lists, token_type_ids), self.config.activation)

    def token_states(self, token_id_lists: Sequence[Sequence[int]],
                     token_type_ids: Sequence[Sequence[int]] | None = None) -> list[torch.Tensor]:
        """An encoder's per-token last hidden states (decoders: not served)."""
        if self.config.kind == "decoder":
            raise ValueError("per-token hidden states are served for encoder models only")
        check_inputs(token_id_lists, self.vocab_size, self.max_seq_length)
        with torch.inference_mode():
            return encoder_token_states(self.backbone, token_id_lists, token_type_ids, self.max_batch_tokens,
                                        self.device)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: cannot read the model config ({e})") from None
    if not isinstance(raw, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return raw


def _tokenizer_max_length(path: Path) -> int | None:
    try:
        value = json.loads((path / "tokenizer_config.json").read_text()).get("model_max_length")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, int) and 0 < value < 1 << 30 else None
