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
    # Vision-language models: a vision encoder beside one of our decoders (ModelConfig.vision holds its part).
    "LlavaForConditionalGeneration": "llava",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
}
MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "bert": "BertModel", "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
VISION_FAMILIES = ("llava", "qwen2_vl")
# transformers' LlamaConfig defaults, for the keys a LLaVA file's text_config may leave out
_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "bos_token_id": 1, "eos_token_id": 2}


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
    # A vision-language model's config.json as given (its vision_config, image token, projector keys); the
    # fields above describe its language model (text_config). None: a text-only model.
    vision: dict | None = None
    image_token_id: int | None = None    # the prompt's image placeholder token (vision models)
    mrope_section: tuple[int, ...] | None = None   # Qwen2-VL: rotary frequencies per t/h/w position (sum: head_dim/2)

    @property
    def is_vision_model(self) -> bool:
        return self.vision is not None

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
        top = raw
        if family in VISION_FAMILIES:
            # the language model's keys: text_config (newer files), else the top level (older Qwen2-VL files)
            text = top.get("text_config") or {}
            # hub LLaVA files give a sparse text_config: transformers fills in LlamaConfig's defaults
            defaults = _LLAMA_DEFAULTS if family == "llava" and text.get("model_type", "llama") == "llama" else {}
            raw = {**defaults, **{k: v for k, v in top.items() if k not in ("vision_config", "text_config")}, **text}
            if not isinstance(top.get("vision_config"), dict):
                raise ConfigError(f"{source}: a {arch} config needs a 'vision_config' object")
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
            attention_bias=bool(raw.get("attention_bias", family in ("qwen2", "qwen2_vl"))),
            qk_norm=family == "qwen3",
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            **(_vision_fields(top, raw, source) if family in VISION_FAMILIES else {}),
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


def _vision_fields(top: dict[str, Any], text: dict[str, Any], source: str) -> dict[str, Any]:
    image_token = top.get("image_token_id", top.get("image_token_index"))
    if not isinstance(image_token, int):
        raise ConfigError(f"{source}: a vision-language config needs 'image_token_id' (or 'image_token_index')")
    rs = text.get("rope_scaling") or text.get("rope_parameters") or {}
    section = rs.get("mrope_section")
    return dict(vision=top, image_token_id=image_token, mrope_section=tuple(section) if section else None)


def _rope_scaling(raw: dict[str, Any], source: str) -> RopeScaling | None:
    rs = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not rs:
        return None
    rope_type = rs.get("rope_type") or rs.get("type") or "default"
    if rope_type in ("default", "mrope"):   # mrope: ModelConfig.mrope_section says how positions split
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
    cpu_float_copies: bool | None = False    # keep float32 copies of packed weights (None: if they fit 1/4 of RAM)
    cpu_quantized_activations: bool = True   # on CPU: packed weights times int8-quantized activations (as llama.cpp;
    #                                          ~1.4x decode); False: float32 activations, HF's numbers exactly
    kv_cache_dtype: str = "auto"             # auto: dtype, but float16 on CPU under int8 activations (pick_kv_dtype)
    cpu_weight_cache: bool = True            # on CPU: packed GGUF weights cached in $LLM_HOME/packed, mapped next start
    tensor_parallel_size: int = 1            # ranks splitting each layer (engine/tp_worker.py); 1: one process
    limit_images_per_prompt: int = 8         # vision models: the most images one prompt may hold
    distributed_backend: str = "auto"        # torch.distributed backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
