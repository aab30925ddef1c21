"""Packed CPU weights kept on disk between starts: the second start of a GGUF model maps the parameters and
packed weights the first start built, instead of dequantizing and repacking every tensor (~2 s of each start
of the default model on a 2-core host).

One file per (GGUF file, load options, code that shapes the layout) under $LLM_HOME/packed/, written once
with torch.save and read back with torch.load(mmap=True): the tensors are the page cache's pages, so a
restart reads nothing it has not touched. The key holds the GGUF's path, size and modification time, the
options that change what is built, torch's version and a hash of the source files that produce the layout,
so a changed file, option or kernel layout never reads a stale cache. A cache that cannot be read or
written is skipped with a log line; loading then goes the long way.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import fields
from pathlib import Path

import torch

from engine.model_files import ModelFiles
from kernels.cpu_quant import PackedWeight
from kernels.user_dir import llm_home

log = logging.getLogger("llm.engine")

FORMAT = 1   # the file's own layout (bump when save/restore change)
# What builds the cached tensors: a change to any of them is a new key.
_SOURCES = ("kernels/cpu_quant.py", "engine/dequant.py", "engine/gguf.py", "engine/loader.py",
            "engine/packed_cache.py")
_ROOT = Path(__file__).resolve().parent.parent


def cache_path(files: ModelFiles, model: torch.nn.Module, options: dict) -> Path | None:
    """Where the cache for this file, model class and load options lives; None if the GGUF is unreadable."""
    try:
        st = files.path.stat()
    except OSError:
        return None
    # <stem>-<options>-<the rest>.pt: a new version of the file or the code replaces its older cache with the
    # same options (save), while caches of other options (float copies or not ...) stay beside it.
    opts = hashlib.sha256(repr((str(files.path.resolve()), type(model).__qualname__,
                                sorted(options.items()))).encode()).hexdigest()[:8]
    key = hashlib.sha256()
    for part in (FORMAT, st.st_size, st.st_mtime_ns, torch.__version__, _source_fingerprint()):
        key.update(repr(part).encode())
    return llm_home() / "packed" / f"{files.path.stem}-{opts}-{key.hexdigest()[:16]}.pt"


def _source_fingerprint() -> str:
    digest = hashlib.sha256()
    # every model family file: families share load_quantized / load_weights through subclassing
    paths = [_ROOT / p for p in _SOURCES] + sorted((_ROOT / "engine" / "models").glob("*.py"))
    for path in paths:
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"missing")
    return digest.hexdigest()


def save(model: torch.nn.Module, path: Path, source: Path) -> None:
    """Write the model's parameters and packed weights (its buffers are computed at each start), atomically:
    a half-written file is never read. Older caches of the same file and options are removed."""
    params = {name: p.data for name, p in model.named_parameters()}
    dropped = [f"{prefix}.{name}" if prefix else name for prefix, m in model.named_modules()
               for name, p in m._parameters.items() if p is None]
    packed = {name: {f.name: getattr(m.packed, f.name) for f in fields(PackedWeight)}
              for name, m in model.named_modules() if getattr(m, "packed", None) is not None}
    state = {"format": FORMAT, "params": params, "dropped": dropped, "packed": packed}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
        path.with_suffix(".source").write_text(str(source.resolve()))
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError
        log.warning("packed weights not cached (%s): the next start packs them again", e)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return
    _prune(path)
    log.info("packed weights cached in %s (%.0f MB)", path, path.stat().st_size / 2**20)


def _prune(kept: Path) -> None:
    """Remove older caches of the same file and options, and caches whose GGUF file is gone (each cache's
    .source file names its GGUF)."""
    same_options = kept.name.rsplit("-", 1)[0]
    for old in kept.parent.glob(f"{same_options}-*.pt"):
        if old != kept and len(old.name) == len(kept.name):
            old.unlink(missing_ok=True)
            old.with_suffix(".source").unlink(missing_ok=True)
    for source in kept.parent.glob("*.source"):
        try:
            gone = not Path(source.read_text()).exists()
        except OSError:
            continue
        if gone:
            source.with_suffix(".pt").unlink(missing_ok=True)
            source.unlink(missing_ok=True)


def restore(model: torch.nn.Module, path: Path) -> bool:
    """Fill a model built on the meta device from the cache at `path`, in place: parameters (tied ones stay
    tied) and packed weights; buffers left empty for the loader to compute. False (model untouched) when there is no usable cache."""
    if not path.exists():
        return False
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:   # torch raises several classes for a damaged file; any of them means "rebuild"
        log.warning("packed weight cache %s unreadable (%s): loading from the GGUF file", path, e)
        return False
    if state.get("format") != FORMAT or not _matches(model, state):
        log.warning("packed weight cache %s does not fit the model: loading from the GGUF file", path)
        return False
    modules = dict(model.named_modules())
    dropped = set(state["dropped"])
    made: dict[int, torch.nn.Parameter] = {}
    for prefix, module in modules.items():
        for name, p in list(module._parameters.items()):
            full = f"{prefix}.{name}" if prefix else name
            if full in dropped:
                module.register_parameter(name, None)
            elif p is not None:
                if id(p) not in made:   # a tied weight: its first name holds it
                    made[id(p)] = torch.nn.Parameter(state["params"][full], requires_grad=False)
                module._parameters[name] = made[id(p)]
        for name, b in module._buffers.items():   # computed ones: the loader fills them after this
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    for name, kwargs in state["packed"].items():
        modules[name].packed = PackedWeight(**kwargs)
    return True


def _matches(model: torch.nn.Module, state: dict) -> bool:
    """Every parameter of the (meta) model is in the cache with its shape, or was dropped there. Tied
    parameters are listed once, under their first name, by named_parameters here as in save()."""
    modules = dict(model.named_modules())
    if any(name not in modules for name in state["packed"]):
        return False
    dropped, params = set(state["dropped"]), state["params"]
    return all(name in dropped or (name in params and tuple(params[name].shape) == tuple(p.shape))
               for name, p in model.named_parameters())
