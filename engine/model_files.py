"""Where a model's files are, and what can be read from them without torch: the config and the tokenizer
(the server process reads these; engine/loader.py reads the tensors)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from engine.config import ConfigError, ModelConfig


class LoadError(Exception):
    """Model files are missing or damaged; one line naming the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """Where a model's files are: a HF directory (config.json + safetensors) or one GGUF file."""
    path: Path
    format: str                          # 'hf' | 'gguf'

    @classmethod
    def at(cls, path: str | Path) -> "ModelFiles":
        path = Path(path)
        if path.is_file():
            if path.suffix == ".gguf":
                return cls(path, "gguf")
            raise LoadError(f"{path}: not a model (expected a .gguf file or a directory with config.json)")
        if path.is_dir():
            if (path / "config.json").exists():
                return cls(path, "hf")
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls(ggufs[0], "gguf")
            if ggufs:
                raise LoadError(f"{path}: holds several .gguf files ({', '.join(g.name for g in ggufs)}); "
                                "name one")
            raise LoadError(f"{path}: no config.json and no .gguf file in this directory")
        raise LoadError(f"{path}: no such file or directory")


@functools.lru_cache(maxsize=4)
def _read_gguf_cached(path: Path, mtime_ns: int):
    from engine.gguf import GGUFError, read_gguf
    try:
        return read_gguf(path)
    except GGUFError as e:
        raise LoadError(str(e)) from None


def gguf_file(files: ModelFiles):
    """The parsed GGUF header (cached: config, tokenizer and weights all read it)."""
    return _read_gguf_cached(files.path, files.path.stat().st_mtime_ns)


def load_config(files: ModelFiles) -> ModelConfig:
    try:
        if files.format == "gguf":
            return ModelConfig.from_hf_dict(gguf_file(files).hf_config(), str(files.path))
        return ModelConfig.from_file(files.path / "config.json")
    except ConfigError as e:
        raise LoadError(str(e)) from None


def load_tokenizer(files: ModelFiles):
    """The model's tokenizer: tokenizer.json from a HF directory, or GGUF metadata."""
    from engine.tokenizer import Tokenizer
    try:
        if files.format == "gguf":
            header = gguf_file(files)
            try:
                return Tokenizer.from_gguf_metadata(header.metadata)
            finally:   # the tokenizer holds its own copy; the cached header need not keep ~100k strings alive
                header.forget_decoded_strings()
        return Tokenizer.from_dir(files.path)
    except (OSError, ValueError) as e:
        raise LoadError(f"{files.path}: cannot load the tokenizer ({e})") from None
