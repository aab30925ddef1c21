"""Model files -> tensors -> parameters: Hugging Face directories (safetensors) and GGUF files (where the files are,
the config and the tokenizer: engine/model_files.py)."""
from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.model_files import LoadError, ModelFiles, gguf_file, load_config, load_tokenizer  # noqa: F401 (re-exported)

log = logging.getLogger("llm.engine")


def iter_weights(files: ModelFiles, dtype: torch.dtype,
                 skip: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, tensor) pairs, converted to `dtype`; GGUF tensors named in `skip` are not read."""
    if files.format == "gguf":
        from engine.gguf import GGUFError
        try:
            yield from gguf_file(files).iter_tensors(dtype, skip)
        except GGUFError as e:
            raise LoadError(str(e)) from None
        return
    for shard in safetensors_files(files.path):
        from safetensors import safe_open
        try:
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(dtype)
        except Exception as e:  # the library's errors are not one class; rewrap with the file name
            raise LoadError(f"{shard}: cannot read safetensors ({e})") from None


def safetensors_files(directory: Path) -> list[Path]:
    """The checkpoint shards, validated: the index's files exist and no file is truncated."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LoadError(f"{index}: malformed index ({e})") from None
        shards = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        shards = sorted(directory.glob("*.safetensors"))
        if not shards:
            raise LoadError(f"{directory}: no *.safetensors weights found")
    for shard in shards:
        check_safetensors(shard)
    return shards


def check_safetensors(path: Path) -> None:
    """Read the header and make sure every tensor's bytes are inside the file."""
    if not path.exists():
        raise LoadError(f"{path}: file not found (named by the checkpoint index)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoadError(f"{path}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise LoadError(f"{path}: truncated safetensors file (header says {header_len} bytes, "
                            f"file has {size - 8})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LoadError(f"{path}: corrupt safetensors header") from None
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise LoadError(f"{path}: truncated safetensors file ({size} bytes, tensors need "
                        f"{8 + header_len + data_end})")


# Float32 copies of packed projection weights are kept (prefill chunks run float32 sgemm on them, the
# fastest way on the CPU) while they take at most this share of the machine's memory; past it the
# layers keep only the packed weights and every batch runs the quantized kernel (a GGUF whose float32
# size would not fit in memory still loads).
FLOAT_COPIES_MAX_MEMORY_SHARE = 0.25


def load_model(files: ModelFiles, config: ModelConfig, dtype: torch.dtype, device: torch.device,
               max_positions: int, cpu_kernels: bool = False, float_copies: bool | None = None,
               tp=None, quantized_activations: bool = False, weight_cache: bool = True) -> torch.nn.Module:
    """Build the model on `device` in `dtype` and fill it from the checkpoint.

    cpu_kernels: on the CPU, run the C kernels (kernels/cpu_kernels.c) where built, and in float32 also
    pack the GGUF file's quantized projection weights for them (small batches read those instead of the
    float32 copies). False: the torch twins and float32 weights only.
    float_copies: keep float32 copies of the packed decoder-layer weights; None: while they fit in
    FLOAT_COPIES_MAX_MEMORY_SHARE of the memory.
    tp: an engine.models.parallel.TensorParallel: build and fill only this rank's slices; None: the whole model.
    quantized_activations: the packed weights in the layout of the kernel that quantizes activations to int8
    per group and sums integer products (kernels/cpu_quant.py pack_int8): faster, not bit-exact.
    weight_cache: where weights are packed (GGUF on the CPU, one rank), map them from the cache the first
    start wrote (engine/packed_cache.py) instead of dequantizing and packing again.
    """
    from engine.models import model_class
    from kernels import get_ops
    cls = model_class(config.family)
    try:
        with torch.device("meta"):
            model = cls(config, get_ops(device.type, cpu_kernels), max_positions, **({"tp": tp} if tp else {}))
    except ValueError as e:   # a config the model cannot be built from (a vision tower's unknown activation ...)
        raise LoadError(f"{files.path}: {e}") from None
    skipped: set[str] = set()
    packs = device.type == "cpu" and cpu_kernels and files.format == "gguf" and dtype == torch.float32
    cache = None
    if packs and tp is None and weight_cache:
        from engine import packed_cache
        cache = packed_cache.cache_path(files, model, {"float_copies": float_copies,
                                                       "quantized_activations": quantized_activations})
        if cache is not None and packed_cache.restore(model, cache):
            log.info("packed weights mapped from %s", cache)
            _rope_buffers(model, files, config, max_positions, device)
            return model.eval()
    if packs:
        # Packed before the float parameters exist, so that layers left packed-only never allocate them.
        packed = _pack_quantized(model, files)
        if quantized_activations:
            _use_int8_activations(model)
        if packed and not _keep_float_copies(model, packed, float_copies):
            skipped = _drop_float_weights(model, packed)
            if tp is None:
                skipped |= _drop_float_vocab_tables(model)
            log.info("float32 copies of %d packed projections not kept (memory): every batch runs packed",
                     len(packed))
    model = materialize(model, dtype, device)
    _rope_buffers(model, files, config, max_positions, device)
    try:
        model.load_weights(iter_weights(files, dtype, skip=skipped), str(files.path))
    except ValueError as e:
        raise LoadError(str(e)) from None
    if device.type == "cpu":
        _column_major_projections(model)
    if cache is not None:
        packed_cache.save(model, cache, files.path)
    return model.eval()


def _rope_buffers(model: torch.nn.Module, files: ModelFiles, config: ModelConfig, max_positions: int,
                  device: torch.device) -> None:
    """Buffers computed at construction (the rotary table) were lost on meta: compute them for real."""
    from engine.models.layers import rope_cos_sin_cache
    model.cos_sin_cache = rope_cos_sin_cache(config.head_dim, config.rope_theta, config.rope_scaling,
                                             max_positions, _rope_freq_factors(files)).to(device)
    if hasattr(model, "init_buffers"):   # a vision tower's own computed buffers (its rotary, position ids)
        model.init_buffers(device)


def materialize(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A model built on the meta device, given uninitialised storage on `device`: floating tensors in `dtype`
    (integer buffers keep theirs); tensors shared between modules stay shared.

    NOTE: not `model.to(dtype).to_empty(device)`: to_empty's empty_like on meta tensors runs torch's Python
    decompositions, which import sympy (~0.45 s of every engine start); and casting after materialising would
    hold a float32 copy of every weight on the device."""
    made: dict[int, torch.Tensor] = {}
    originals: list[torch.Tensor] = []   # kept alive while `made` is keyed by their ids

    def new(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in made:
            originals.append(t)
            made[id(t)] = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
        return made[id(t)]

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            if not isinstance(made.get(id(p)), torch.nn.Parameter):
                made[id(p)] = torch.nn.Parameter(new(p), requires_grad=False)
            module._parameters[name] = made[id(p)]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = new(b)
    return model


def _pack_quantized(model: torch.nn.Module, files: ModelFiles) -> list[str]:
    """Attach packed weights to the (still meta) model; returns the packed decoder-layer module names."""
    from kernels import cpu_build
    if cpu_build.load_library() is None:
        log.warning("CPU kernels unavailable (%s): torch ops and float32 weights", cpu_build.load_error)
        return []
    from engine.gguf import GGUFError
    try:
        num_bytes = model.load_quantized(gguf_file(files).iter_quantized())
    except (GGUFError, ValueError) as e:
        raise LoadError(str(e)) from None
    if num_bytes:
        log.info("quantized CPU kernel: %.0f MB of packed weights", num_bytes / 2**20)
    return [name for name, m in model.named_modules()
            if name.startswith("layers.") and getattr(m, "packed", None) is not None]


def _use_int8_activations(model: torch.nn.Module) -> None:
    from kernels.cpu_quant import to_int8_layout
    for m in model.modules():
        if getattr(m, "packed", None) is not None:
            m.packed = to_int8_layout(m.packed)


def _keep_float_copies(model: torch.nn.Module, packed: list[str], wanted: bool | None) -> bool:
    if wanted is not None:
        return wanted
    modules = dict(model.named_modules())
    float_bytes = sum(modules[name].weight.numel() * 4 for name in packed)
    return float_bytes <= FLOAT_COPIES_MAX_MEMORY_SHARE * _physical_memory_bytes()


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62   # unknown: keep the copies


def _drop_float_weights(model: torch.nn.Module, packed: list[str]) -> set[str]:
    """Remove the float weight parameter of each packed decoder-layer projection (linear() then always
    runs packed); returns the checkpoint names the loader need not read."""
    from engine.models.llama import FUSED_SHARDS
    modules = dict(model.named_modules())
    skipped = set()
    for name in packed:
        modules[name].register_parameter("weight", None)
        short = name.rsplit(".", 1)[-1]
        shards = [ckpt for ckpt, (fused, _) in FUSED_SHARDS.items() if fused == short] or [short]
        prefix = name.rsplit(".", 1)[0]
        skipped.update(f"model.{prefix}.{shard}.weight" for shard in shards)
    return skipped


def _drop_float_vocab_tables(model: torch.nn.Module) -> set[str]:
    """Without float copies, the token embedding and LM head keep only their packed tables too (113 MB each for
    the default model's vocabulary): the lookup reads packed rows (model.embed), the LM head the packed kernel."""
    skipped = set()
    for name in ("embed_tokens", "lm_head"):
        module = getattr(model, name, None)
        if module is not None and getattr(module, "packed", None) is not None and hasattr(model, "embed"):
            module.register_parameter("weight", None)
            skipped.add(f"model.{name}.weight" if name == "embed_tokens" else f"{name}.weight")
    return skipped


def _column_major_projections(model: torch.nn.Module) -> None:
    """Store the decoder's projection weights column-major (same logical [out, in] tensor).

    NOTE: measured on this CPU (MKL sgemm, 2 threads): for 4-16 rows, the usual decode batch sizes,
    x @ W^T runs up to 2x faster with W^T contiguous, and never slower for 1 or 32+ rows.
    """
    for name, param in model.named_parameters():
        if param.dim() == 2 and name.rsplit(".", 2)[-2] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            param.data = param.data.t().contiguous().t()


def _rope_freq_factors(files: ModelFiles) -> torch.Tensor | None:
    """llama.cpp stores Llama-3.1-style rope scaling as per-frequency divisors (rope_freqs.weight)."""
    if files.format != "gguf":
        return None
    gguf = gguf_file(files)
    if not any(t.name == "rope_freqs.weight" for t in gguf.tensor_infos):
        return None
    return gguf.read_tensor("rope_freqs.weight", torch.float32)
