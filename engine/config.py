"""Engine configuration: ModelConfig from config.json or GGUF metadata, and the engine's own settings."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model config is unusable; the message names the file and what is wrong."""


# HF `architectures` entry -> our model family (engine/models/<family>.py).
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "BertModel": "bert",
    # Sequence classifiers over our decoders (engine/models/sequence_classification.py adds the head).
    "LlamaForSequenceClassification": "llama",
    "Qwen2ForSequenceClassification": "qwen2",
}
MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "bert": "BertModel",
}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    rope_type: str                       # 'llama3' | 'linear' | 'dynamic' ('default' is None)
    factor: float = 1.0
    low_freq_factor: float = 1.0         # llama3
    high_freq_factor: float = 4.0        # llama3
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str                    # HF class name, e.g. 'LlamaForCausalLM'
    family: str                          # our model file: 'llama' | 'qwen2' | 'qwen3' | 'bert'
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool                 # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool                        # per-head RMSNorm on q and k before rotary (Qwen3)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str                     # dtype the checkpoint was saved in ('float32', 'bfloat16', ...)

    @property
    def is_embedding_model(self) -> bool:
        """A pooling model (an encoder, or a decoder with a classification head): it does not generate."""
        return self.family == "bert" or self.architecture.endswith("ForSequenceClassification")

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str) -> "ModelConfig":
        """Build from a config.json-style dict; `source` names the file in error messages."""
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else MODEL_TYPES.get(raw.get("model_type", ""), "")
        if arch not in ARCHITECTURES:
            name = arch or raw.get("model_type") or "(none given)"
            raise ConfigError(f"{source}: unsupported architecture {name!r}; "
                              f"supported: {', '.join(sorted(ARCHITECTURES))}")
        family = ARCHITECTURES[arch]
        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"]
        missing = [k for k in required if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        for key in required:
            if not isinstance(raw[key], int) or raw[key] <= 0:
                raise ConfigError(f"{source}: {key} must be a positive integer, got {raw[key]!r}")
        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                              f"num_key_value_heads ({kv_heads})")
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return cls(
            architecture=arch, family=family,
            vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", raw.get("layer_norm_eps", 1e-6))),
            rope_theta=float(raw.get("rope_theta", (raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(raw, source),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(raw, str(path))


def _rope_scaling(raw: dict[str, Any], source: str) -> RopeScaling | None:
    rs = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not rs:
        return None
    rope_type = rs.get("rope_type") or rs.get("type") or "default"
    if rope_type == "default":
        return None
    if rope_type not in ("llama3", "linear", "dynamic"):
        raise ConfigError(f"{source}: unsupported rope_scaling type {rope_type!r}; "
                          "supported: llama3, linear, dynamic")
    return RopeScaling(
        rope_type=rope_type, factor=float(rs.get("factor", 1.0)),
        low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rs.get("original_max_position_embeddings",
                                                    raw.get("max_position_embeddings", 8192))))


# The packaged executable (launcher/frozen.py) runs a tensor-parallel worker (engine/tp_worker.py) when given this.
TP_WORKER_FLAG = "--llm-tp-worker"

# The batching defaults: the one place they are set (EngineConfig, SchedulerConfig and the profile's
# [engine] keys all read them).
DEFAULT_MAX_NUM_SEQS = 256             # sequences in one batch
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048  # tokens (prefill chunks + decodes) computed per step
DEFAULT_BLOCK_SIZE = 16                # tokens per KV block


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What the engine core needs to start; picklable (it crosses into the engine process)."""
    model: str                               # resolved local path: a HF directory or a .gguf file
    served_name: str = ""                    # canonical model name (defaults to the path)
    dtype: str = "auto"                      # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"                     # auto | cuda | cpu
    max_model_len: int | str | None = None   # None: the model's context; 'auto': the most the cache holds
    block_size: int = DEFAULT_BLOCK_SIZE
    kv_cache_gib: float | None = None        # KV budget in GiB (default on CPU: 2)
    kv_cache_memory_fraction: float = 0.90   # on CUDA: fraction of GPU memory for weights + KV
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    num_threads: int | None = None           # torch CPU threads in the engine process (None: all cores)
    cuda_graphs: bool = True                 # on CUDA: replay decode-only steps from captured graphs
    cuda_graph_sizes: tuple[int, ...] = ()   # batch sizes to capture; empty: 1, 2, 4, 8, 16, 24, ... (step 8)
    cuda_graph_max_batch: int | None = None  # largest captured batch (None: max_num_seqs); larger run eagerly
    autotune: bool = True                    # on CUDA: time kernel configs at startup (cached per GPU)
    autotune_cache_dir: str | None = None    # tuned-config cache (None: $LLM_HOME/autotune)
    cpu_kernels: bool = True                 # on CPU: C kernels (kernels/cpu_kernels.c), GGUF 4/8-bit weights packed
    cpu_float_copies: bool | None = None     # keep float32 copies of packed weights (None: if they fit 1/4 of RAM)
    tensor_parallel_size: int = 1            # ranks splitting each layer (engine/tp_worker.py); 1: one process
    distributed_backend: str = "auto"        # torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
