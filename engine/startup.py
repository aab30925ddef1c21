"""What the engine decides once, at startup: device, dtype, context length, KV blocks, generation defaults."""
from __future__ import annotations

import json

import torch

from engine.config import EngineConfig, ModelConfig
from engine.loader import LoadError, ModelFiles

CPU_DEFAULT_KV_GIB = 2.0


class StartupError(Exception):
    """The engine cannot start with this configuration; the message says what would work."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StartupError("device 'cuda' was asked for, but torch sees no CUDA GPU")
    if name not in ("cuda", "cpu"):
        raise StartupError(f"unknown device {name!r}: use auto, cuda or cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise StartupError(f"unknown dtype {name!r}: use auto, float32, float16 or bfloat16")
    return dtypes[name]


def pick_kv_dtype(name: str, dtype: torch.dtype, device: torch.device, model: torch.nn.Module) -> torch.dtype:
    """The K/V cache's element type. auto: the activations' dtype, except on the CPU where the model runs
    the int8-activation kernels (llama.cpp's numerics: its cache is float16 too), where float16 holds twice
    the tokens in the same memory; the exact path (float32 activations) keeps a float32 cache."""
    if name == "auto":
        int8 = any(getattr(getattr(m, "packed", None), "activations", None) == "int8" for m in model.modules())
        return torch.float16 if device.type == "cpu" and dtype == torch.float32 and int8 else dtype
    kv = pick_dtype(name, device)
    if kv != dtype and device.type != "cpu":
        raise StartupError(f"kv_cache_dtype={name!r} with dtype {str(dtype).removeprefix('torch.')}: on "
                           f"{device.type} the cache holds the model dtype (use auto)")
    return kv


def initial_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    """The context length asked for (or the model's), before the KV cache may cut an 'auto' one down."""
    limit = model_config.max_position_embeddings
    if config.max_model_len in (None, "auto"):
        return limit
    if not isinstance(config.max_model_len, int) or config.max_model_len < 1:
        raise StartupError(f"max_model_len must be a positive integer or 'auto', got {config.max_model_len!r}")
    if config.max_model_len > limit and (model_config.rope_scaling is None):
        raise StartupError(f"max_model_len={config.max_model_len} exceeds the model's context of {limit}")
    return config.max_model_len


def num_kv_blocks(config: EngineConfig, bytes_per_block: int, device: torch.device) -> int:
    """KV blocks that fit the budget: kv_cache_gib, or on CUDA the memory fraction left after the weights."""
    if device.type == "cuda" and config.kv_cache_gib is None:
        torch.cuda.empty_cache()   # blocks the loader freed are not in use: give them back before measuring
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = total * config.kv_cache_memory_fraction - used - _activation_reserve(config)
        if budget < bytes_per_block:
            raise StartupError(
                f"not enough GPU memory for the KV cache: {total / 2**30:.1f} GiB total, "
                f"{used / 2**30:.1f} GiB in use after loading the weights, fraction "
                f"{config.kv_cache_memory_fraction}")
    else:
        gib = config.kv_cache_gib if config.kv_cache_gib is not None else CPU_DEFAULT_KV_GIB
        budget = gib * 2**30
    num_blocks = int(budget // bytes_per_block)
    if num_blocks < 1:
        raise StartupError(f"a KV budget of {budget / 2**30:.3f} GiB holds no block "
                           f"({bytes_per_block} bytes each)")
    return num_blocks


def _activation_reserve(config: EngineConfig) -> int:
    return 512 * 2**20 + config.max_num_batched_tokens * 64 * 2**10


def generation_defaults(files: ModelFiles, model_config: ModelConfig) -> tuple[frozenset[int], dict]:
    """eos ids (config + generation_config.json) and the sampling defaults the model ships with."""
    eos = set(model_config.eos_token_ids)
    defaults: dict = {}
    path = files.path / "generation_config.json" if files.format == "hf" else None
    if path is not None and path.exists():
        try:
            gen = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LoadError(f"{path}: not valid JSON ({e})") from None
        g_eos = gen.get("eos_token_id")
        eos.update(g_eos if isinstance(g_eos, list) else [g_eos] if isinstance(g_eos, int) else [])
        for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if key in gen and gen.get("do_sample", True) is not False:
                defaults[key] = gen[key]
    return frozenset(eos), defaults
