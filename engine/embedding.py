"""Embeddings: a BERT encoder with sentence-transformers pooling, and pooled decoder hidden states."""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.attention import AttentionMetadata
from engine.config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS
from engine.loader import ModelFiles, iter_weights, materialize
from engine.messages import EmbedOutput, EmbedRequest
from engine.validation import check_inputs
from engine.models.bert import BertConfig, BertModel

# sentence-transformers' Pooling config key -> our mode name, in the order it concatenates them.
_ST_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                    "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                    "pooling_mode_lasttoken": "lasttoken"}
DECODER_POOLING = ("last", "mean")


@dataclass(frozen=True, slots=True)
class PoolingConfig:
    """How token states become one vector, as a sentence-transformers directory says."""
    modes: tuple[str, ...]      # subset of cls/max/mean/mean_sqrt_len/lasttoken, concatenated in this order
    normalize: bool             # L2-normalize the pooled vector (a Normalize module follows pooling)
    max_seq_length: int         # longest input accepted, special tokens included

    @classmethod
    def from_dir(cls, path: Path, config: BertConfig) -> "PoolingConfig":
        """Read modules.json, the Pooling module's config.json and sentence_bert_config.json.

        A plain HF directory (no modules.json) gets sentence-transformers' defaults: mean, unnormalized.
        """
        modes: tuple[str, ...] = ("mean",)
        normalize = False
        for module in _read_json(path / "modules.json", default=[]):
            kind = str(module.get("type", "")).rpartition(".")[2]
            if kind == "Pooling":
                modes = _pooling_modes(path / module.get("path", "") / "config.json")
            elif kind == "Normalize":
                normalize = True
            elif kind != "Transformer":
                raise ValueError(f"{path / 'modules.json'}: unsupported sentence-transformers module "
                                 f"{module.get('type')!r} (supported: Transformer, Pooling, Normalize)")
        limit = config.max_seq_length
        st_max = _read_json(path / "sentence_bert_config.json", default={}).get("max_seq_length")
        tok_max = _read_json(path / "tokenizer_config.json", default={}).get("model_max_length")
        max_len = st_max or (tok_max if isinstance(tok_max, int) and tok_max < limit else limit)
        return cls(modes=modes, normalize=normalize, max_seq_length=min(int(max_len), limit))


def _pooling_modes(path: Path) -> tuple[str, ...]:
    raw = _read_json(path, default=None)
    if raw is None:
        raise ValueError(f"{path}: the Pooling module's config is missing")
    if raw.get("pooling_mode_weightedmean_tokens"):
        raise ValueError(f"{path}: weighted-mean pooling is not supported")
    modes = tuple(mode for key, mode in _ST_POOLING_KEYS.items() if raw.get(key))
    if not modes:
        raise ValueError(f"{path}: no pooling mode is enabled")
    return modes


def _read_json(path: Path, default):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def pool_padded(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [B, L, H] (right-padded), mask [B, L] (nonzero = real token) -> [B, H] float32."""
    hidden = hidden.float()
    m = mask.to(hidden.dtype)[..., None]                                   # [B, L, 1]
    lengths = mask.sum(dim=1)                                              # [B]
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).amax(dim=1)
    summed = (hidden * m).sum(dim=1)
    count = lengths.to(hidden.dtype)[:, None]
    if mode == "mean":
        return summed / count
    if mode == "mean_sqrt_len":
        return summed / count.sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}")


def pool_packed(hidden: torch.Tensor, seq_lens: Sequence[int], mode: str) -> torch.Tensor:
    """hidden [T, H] with sequences back to back -> [B, H] float32; mode 'last' or 'mean'."""
    hidden = hidden.float()
    lens = torch.tensor(list(seq_lens), device=hidden.device)
    ends = lens.cumsum(0)
    if mode == "last":
        return hidden[ends - 1]
    if mode == "mean":
        seq_of_token = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), lens)
        sums = hidden.new_zeros(len(lens), hidden.shape[1]).index_add_(0, seq_of_token, hidden)
        return sums / lens[:, None].to(hidden.dtype)
    raise ValueError(f"unknown decoder pooling {mode!r}; use one of {', '.join(DECODER_POOLING)}")


def chunks(lengths: Sequence[int], max_batch_tokens: int, padded: bool) -> Iterator[list[int]]:
    """Input indices grouped longest first so each group costs at most max_batch_tokens
    (padded: rows x longest row; packed: the sum); one input over budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    group: list[int] = []
    longest = total = 0
    for i in order:
        n = lengths[i]
        cost = max(longest, n) * (len(group) + 1) if padded else total + n
        if group and cost > max_batch_tokens:
            yield group
            group, longest, total = [], 0, 0
        group.append(i)
        longest, total = max(longest, n), total + n
    if group:
        yield group


# Padded tokens per encoder forward. On the CPU ~1k keeps a layer's activations in cache: all-MiniLM-L6-v2 over
# 101 short texts takes 265 ms in groups of <= 1024 tokens against 353 ms as one batch of 1.7k (and 2.1 s
# against 2.6 s for 101 x 128 tokens) on the 2-core dev machine; a GPU wants the big batch.
CPU_ENCODER_BATCH_TOKENS = 1024
GPU_ENCODER_BATCH_TOKENS = 8192


class EmbeddingModel:
    """A sentence-transformers encoder: token id lists -> pooled (and maybe normalized) vectors."""

    def __init__(self, model: BertModel, pooling: PoolingConfig, max_batch_tokens: int | None = None):
        self.model = model
        self.pooling = pooling
        self.device = next(model.parameters()).device
        self.max_batch_tokens = max_batch_tokens or encoder_batch_tokens(self.device)

    @classmethod
    def from_path(cls, path: str | Path, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> "EmbeddingModel":
        """Load a sentence-transformers (or plain HF BERT) directory; errors are ValueError/LoadError."""
        files = ModelFiles.at(path)
        if files.format != "hf":
            raise ValueError(f"{path}: embedding models load from a HF directory, not a GGUF file")
        config = BertConfig.from_file(files.path / "config.json")
        pooling = PoolingConfig.from_dir(files.path, config)
        with torch.device("meta"):
            model = BertModel(config)
        # Built on meta so no time goes on a random init that the checkpoint overwrites.
        model = materialize(model, dtype, torch.device(device))
        model.load_weights(iter_weights(files, dtype), str(files.path))
        return cls(model.eval(), pooling)

    @property
    def dimensions(self) -> int:
        """Length of each output vector."""
        return self.model.config.hidden_size * len(self.pooling.modes)

    @property
    def max_seq_length(self) -> int:
        return self.pooling.max_seq_length

    @torch.inference_mode()
    def embed(self, token_id_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """Token id lists (special tokens included) -> [B, dimensions] float32 on the CPU, input order."""
        config = self.model.config
        check_inputs(token_id_lists, config.vocab_size, self.pooling.max_seq_length)
        out = torch.empty(len(token_id_lists), self.dimensions)
        for group, ids, mask, _ in padded_batches(token_id_lists, config.pad_token_id, self.max_batch_tokens,
                                                  self.device):
            hidden = self.model(ids, mask)
            pooled = torch.cat([pool_padded(hidden, mask, mode) for mode in self.pooling.modes], dim=-1)
            if self.pooling.normalize:
                pooled = F.normalize(pooled, dim=-1)
            out[group] = pooled.cpu()
        return out

    @torch.inference_mode()
    def token_states(self, token_id_lists: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Per-token last hidden states: one [len(ids), hidden] float32 CPU tensor per input."""
        config = self.model.config
        check_inputs(token_id_lists, config.vocab_size, self.pooling.max_seq_length)
        return encoder_token_states(self.model, token_id_lists, None, self.max_batch_tokens, self.device)


def encoder_batch_tokens(device: torch.device) -> int:
    return CPU_ENCODER_BATCH_TOKENS if device.type == "cpu" else GPU_ENCODER_BATCH_TOKENS


def padded_batches(token_id_lists: Sequence[Sequence[int]], pad_token_id: int, max_batch_tokens: int,
                   device: torch.device, token_type_ids: Sequence[Sequence[int]] | None = None
                   ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Right-padded groups (chunks(), longest first): (input indices, ids [B, L], mask [B, L], token
    types [B, L] or None) on `device`."""
    lengths = [len(ids) for ids in token_id_lists]
    for group in chunks(lengths, max_batch_tokens, padded=True):
        width = max(lengths[i] for i in group)
        ids = torch.full((len(group), width), pad_token_id, dtype=torch.int64)
        mask = torch.zeros(len(group), width, dtype=torch.int64)
        types = None if token_type_ids is None else torch.zeros(len(group), width, dtype=torch.int64)
        for row, i in enumerate(group):
            ids[row, : lengths[i]] = torch.tensor(token_id_lists[i])
            mask[row, : lengths[i]] = 1
            if types is not None:
                types[row, : lengths[i]] = torch.tensor(token_type_ids[i])
        yield group, ids.to(device), mask.to(device), None if types is None else types.to(device)


def encoder_token_states(model: BertModel, token_id_lists: Sequence[Sequence[int]],
                         token_type_ids: Sequence[Sequence[int]] | None, max_batch_tokens: int,
                         device: torch.device) -> list[torch.Tensor]:
    """An encoder's last hidden states per input ([len(ids), hidden] float32 on the CPU), input order."""
    out: list[torch.Tensor | None] = [None] * len(token_id_lists)
    for group, ids, mask, types in padded_batches(token_id_lists, model.config.pad_token_id, max_batch_tokens,
                                                  device, token_type_ids):
        hidden = model(ids, mask, types).float().cpu()
        for row, i in enumerate(group):
            out[i] = hidden[row, : len(token_id_lists[i])].clone()
    return out


@torch.inference_mode()
def decoder_embed(core_or_model, token_id_lists: Sequence[Sequence[int]], pooling: str = "last",
                  normalize: bool = True, *, max_batch_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS) -> torch.Tensor:
    """Pool a decoder's final hidden states (after the final norm) -> [B, H] float32 on the CPU.

    core_or_model: an EngineCore (its model, max_model_len and block size) or a decoder model from
    engine.models (its rotary table bounds the length). Runs plain prefills over a temporary KV cache
    of its own, so the engine's cache and requests are untouched.
    """
    if pooling not in DECODER_POOLING:
        raise ValueError(f"unknown decoder pooling {pooling!r}; use one of {', '.join(DECODER_POOLING)}")
    if isinstance(core_or_model, torch.nn.Module):
        model, block_size = core_or_model, DEFAULT_BLOCK_SIZE
        max_len = model.cos_sin_cache.shape[0]
    else:
        model, block_size = core_or_model.model, core_or_model.config.block_size
        max_len = core_or_model.max_model_len
    config = model.config
    check_inputs(token_id_lists, config.vocab_size, max_len)
    param = next(model.parameters())
    lengths = [len(ids) for ids in token_id_lists]
    groups = list(chunks(lengths, max_batch_tokens, padded=False))
    num_blocks = max(sum(math.ceil(lengths[i] / block_size) for i in g) for g in groups) if groups else 0
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    # NOTE: zeros, not empty: attention reads whole blocks and masks the tail by score, and a NaN
    # left in uninitialised memory would survive 0 * NaN in probs @ V.
    kv_caches = [(torch.zeros(shape, dtype=param.dtype, device=param.device),
                  torch.zeros(shape, dtype=param.dtype, device=param.device))
                 for _ in range(config.num_hidden_layers)]
    out = torch.empty(len(token_id_lists), config.hidden_size)
    for group in groups:
        group_lens = [lengths[i] for i in group]
        ids = torch.tensor([t for i in group for t in token_id_lists[i]], device=param.device)
        positions = torch.cat([torch.arange(n) for n in group_lens]).to(param.device)
        meta = _prefill_metadata(group_lens, block_size, param.device)
        hidden = model(ids, positions, kv_caches, meta)
        pooled = pool_packed(hidden, group_lens, pooling)
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        out[group] = pooled.cpu()
    return out


def _prefill_metadata(seq_lens: list[int], block_size: int, device: torch.device) -> AttentionMetadata:
    """Each sequence a fresh prefill on consecutive blocks of the temporary cache (from block 0)."""
    tables: list[list[int]] = []
    slots: list[int] = []
    next_block = 0
    for n in seq_lens:
        num = math.ceil(n / block_size)
        tables.append(list(range(next_block, next_block + num)))
        slots.extend(range(next_block * block_size, next_block * block_size + n))
        next_block += num
    return AttentionMetadata.for_prefill(device, slots, tables, seq_lens, seq_lens)


def embed_request(embed: Callable[[list[list[int]]], torch.Tensor], request: EmbedRequest) -> EmbedOutput:
    """Run an embedding call on inputs the client has checked (engine.validation.check_inputs)."""
    vectors = embed(request.inputs)
    return EmbedOutput(request.request_id, embeddings=vectors.numpy(),
                       num_tokens=sum(len(ids) for ids in request.inputs))


def decoder_embed_request(core, request: EmbedRequest) -> EmbedOutput:
    """/v1/embeddings on a decoder: its hidden states pooled (request.pooling, default 'last')."""
    assert request.task == "embed", f"{request.request_id}: a decoder LM only embeds (task {request.task!r})"
    pooling = request.pooling or "last"
    return embed_request(lambda inputs: decoder_embed(core, inputs, pooling, request.normalize), request)
