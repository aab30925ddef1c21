"""Whisper weights from CTranslate2's model.bin (faster-whisper's format) as HF-named tensors and an HF config."""
from __future__ import annotations

import math
import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# NOTE: the layout is CTranslate2's own writer (specs/model_spec.py, _serialize): uint32 binary version,
# spec name, uint32 spec revision, variables, aliases. Its C++ reader parses versions 4-6 alike (5 changed
# only int8 rounding); 1-3 stored item sizes instead of dtype ids.
_VERSIONS = range(4, 7)
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")   # CTranslate2's DataType enum order
_GELU = 3                                                                # its Activation enum
_SPEC = "WhisperSpec"


@dataclass(frozen=True, slots=True)
class _Variable:
    dtype: str
    shape: tuple[int, ...]
    offset: int             # of the raw bytes in the file

    @property
    def numpy_dtype(self) -> np.dtype:
        # NOTE: bfloat16 has no numpy dtype: its bits travel as uint16 and become bfloat16 in torch
        return np.dtype("uint16" if self.dtype == "bfloat16" else self.dtype)


class _Cursor:
    """Reads the header fields in order; running off the end is a ValueError naming the file."""

    def __init__(self, buf: bytes | mmap.mmap, where: str) -> None:
        self.buf, self.pos, self.where = buf, 0, where

    def take(self, fmt: str, what: str) -> tuple[int, ...]:
        size = struct.calcsize("<" + fmt)
        self.need(size, what)
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return values

    def need(self, size: int, what: str) -> None:
        if self.pos + size > len(self.buf):
            raise ValueError(f"{self.where}: truncated: {what} needs bytes {self.pos}..{self.pos + size} "
                             f"but the file has {len(self.buf)}")

    def string(self, what: str) -> str:
        (length,) = self.take("H", f"the length of {what}")
        self.need(length, what)
        raw = bytes(self.buf[self.pos:self.pos + length])
        self.pos += length
        if not raw.endswith(b"\0"):
            raise ValueError(f"{self.where}: not a CTranslate2 model: {what} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.where}: not a CTranslate2 model: {what} is not UTF-8") from None


def _model_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / "model.bin" if path.is_dir() else path


def _map(file: Path, access: int) -> mmap.mmap:
    with open(file, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{file}: empty file, not a CTranslate2 model")
        return mmap.mmap(f.fileno(), 0, access=access)   # NOTE: the map keeps its own handle on the file


def _read_spec(cur: _Cursor) -> str:
    (version,) = cur.take("I", "the binary version")
    if version not in _VERSIONS:
        raise ValueError(f"{cur.where}: not a CTranslate2 model (binary version {version}; this reader knows "
                         f"{_VERSIONS.start}-{_VERSIONS.stop - 1})")
    return cur.string("the spec name")


def is_ctranslate2_whisper(path: str | os.PathLike) -> bool:
    """Whether path is a directory holding a CTranslate2 model.bin of a Whisper model (reads ~20 bytes)."""
    file = Path(path) / "model.bin"
    try:
        with open(file, "rb") as f:
            return _read_spec(_Cursor(f.read(4 + 2 + len(_SPEC) + 1), str(file))) == _SPEC
    except (OSError, ValueError):
        return False


def _variables(buf: mmap.mmap, where: str) -> dict[str, _Variable]:
    """Every variable's dtype, shape and offset (aliases resolved); the data itself is not touched."""
    cur = _Cursor(buf, where)
    spec = _read_spec(cur)
    if spec != _SPEC:
        raise ValueError(f"{where}: a CTranslate2 {spec or '(unnamed)'} model, not Whisper ({_SPEC})")
    cur.take("I", "the spec revision")
    (count,) = cur.take("I", "the number of variables")
    found: dict[str, _Variable] = {}
    for i in range(count):
        name = cur.string(f"variable {i}'s name")
        (rank,) = cur.take("B", f"{name}'s rank")
        shape = cur.take("I" * rank, f"{name}'s shape")
        (type_id, num_bytes) = cur.take("BI", f"{name}'s dtype and size")
        if type_id >= len(_DTYPES):
            raise ValueError(f"{where}: {name}: unknown dtype id {type_id} (known: {', '.join(_DTYPES)})")
        var = _Variable(_DTYPES[type_id], shape, cur.pos)
        if num_bytes != math.prod(shape) * var.numpy_dtype.itemsize:
            raise ValueError(f"{where}: {name}: {num_bytes} bytes do not hold {var.dtype} of shape {list(shape)}")
        cur.need(num_bytes, f"{name}'s data")
        found[name] = var
        cur.pos += num_bytes
    (num_aliases,) = cur.take("I", "the number of aliases")
    for _ in range(num_aliases):
        alias, target = cur.string("an alias"), cur.string("an alias target")
        if target not in found:
            raise ValueError(f"{where}: alias {alias} names a missing variable {target}")
        found[alias] = found[target]
    return found


def ctranslate2_dtype(path: str | os.PathLike) -> str:
    """The dtype of most of a CTranslate2 Whisper model.bin's values (float16, int8 ...), read from its header."""
    file = _model_file(path)
    with _map(file, mmap.ACCESS_READ) as buf:
        variables = set(_variables(buf, str(file)).values())   # NOTE: a set: an alias is not counted twice
    totals = Counter({var.dtype: 0 for var in variables})
    for var in variables:
        totals[var.dtype] += math.prod(var.shape)
    return totals.most_common(1)[0][0] if totals else "none"


class _Tensors:
    """Variables as numpy views of the mapped file, quantized ones dequantized to float32."""

    def __init__(self, buf: mmap.mmap, variables: dict[str, _Variable], where: str) -> None:
        self.buf, self.vars, self.where = buf, variables, where
        self.used: set[str] = set()

    def raw(self, name: str) -> np.ndarray:
        if name not in self.vars:
            raise ValueError(f"{self.where}: variable {name} is missing (not a Whisper model this reader knows)")
        self.used.add(name)
        var = self.vars[name]
        return np.frombuffer(self.buf, var.numpy_dtype, math.prod(var.shape), var.offset).reshape(var.shape)

    def scalar(self, name: str) -> int:
        return int(self.raw(name))

    def weight(self, name: str) -> np.ndarray:
        """name's values; an int8/int16 weight is divided by its scale (CTranslate2 stores value * scale)."""
        value = self.raw(name)
        scope = name.rsplit("/", 1)[0]
        if f"{scope}/weight_zero" in self.vars:
            raise ValueError(f"{self.where}: {scope} is AWQ-quantized (weight_zero); only float and CTranslate2's "
                             f"int8/int16 weights are supported")
        if value.dtype.kind != "i":
            return value
        scale = self.raw(f"{scope}/weight_scale").astype(np.float32)
        return value.astype(np.float32) / scale.reshape(scale.shape + (1,) * (value.ndim - scale.ndim))

    def count_layers(self, stack: str) -> int:
        n = 0
        while f"{stack}/layer_{n}/ffn/linear_0/weight" in self.vars:
            n += 1
        return n


def _linear(t: _Tensors, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    out[f"{hf}.weight"] = t.weight(f"{ct2}/weight")
    if f"{ct2}/bias" in t.vars:
        out[f"{hf}.bias"] = t.raw(f"{ct2}/bias")


def _norm(t: _Tensors, ct2: str, hf: str, out: dict[str, np.ndarray]) -> None:
    out[f"{hf}.weight"], out[f"{hf}.bias"] = t.raw(f"{ct2}/gamma"), t.raw(f"{ct2}/beta")


def _fused(t: _Tensors, ct2: str, hf: str, parts: tuple[str, ...], out: dict[str, np.ndarray]) -> None:
    """Split a fused projection (rows [q; k; v] or [k; v]) into HF's separate ones."""
    weights = np.split(t.weight(f"{ct2}/weight"), len(parts))
    biases = np.split(t.raw(f"{ct2}/bias"), len(parts))
    for part, weight, bias in zip(parts, weights, biases):
        out[f"{hf}.{part}_proj.weight"] = weight
        # NOTE: HF's k_proj has no bias (a key bias shifts all of a query's scores alike: softmax ignores it);
        # CTranslate2 fused zeros in its place
        if part != "k":
            out[f"{hf}.{part}_proj.bias"] = bias


def _layer(t: _Tensors, ct2: str, hf: str, is_decoder: bool, out: dict[str, np.ndarray]) -> None:
    _fused(t, f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ("q", "k", "v"), out)
    _linear(t, f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj", out)
    _norm(t, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm", out)
    if is_decoder:
        _linear(t, f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj", out)
        _fused(t, f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k", "v"), out)
        _linear(t, f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj", out)
        _norm(t, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm", out)
    _linear(t, f"{ct2}/ffn/linear_0", f"{hf}.fc1", out)
    _linear(t, f"{ct2}/ffn/linear_1", f"{hf}.fc2", out)
    _norm(t, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm", out)


def _check_whisper(t: _Tensors) -> None:
    """Refuse settings our Whisper model does not implement (CTranslate2 stores them as scalar variables)."""
    expected = {"decoder/activation": _GELU, "decoder/pre_norm": 1, "decoder/alibi": 0}
    for name, value in expected.items():
        if name in t.vars and t.scalar(name) != value:
            raise ValueError(f"{t.where}: {name} is {t.scalar(name)}; Whisper has {value}")
    projection = t.vars.get("decoder/projection/weight")
    if projection is not None and projection != t.vars.get("decoder/embeddings/weight"):
        raise ValueError(f"{t.where}: decoder/projection/weight is not tied to decoder/embeddings/weight "
                         f"(Whisper ties them)")
    t.used.add("decoder/projection/weight")


def read_ctranslate2_whisper(path: str | os.PathLike) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """(HF config fields, HF-named tensors) of a CTranslate2 Whisper model.bin (or the directory holding it).

    Tensors keep the stored dtype (int8/int16 weights come back dequantized to float32) and are views of a
    copy-on-write map of the file: nothing is read until used. proj_out.weight is left out: it is tied to
    model.decoder.embed_tokens.weight. A file this reader cannot read is a ValueError naming it.
    """
    import torch  # NOTE: here, not at the top: `llm list` imports this module for is_ctranslate2_whisper
    file = _model_file(path)
    where = str(file)
    # NOTE: ACCESS_COPY makes the views writable (torch.from_numpy warns on read-only ones) while writes,
    # which nothing does, would stay private; pages are read from disk only when touched.
    buf = _map(file, mmap.ACCESS_COPY)
    t = _Tensors(buf, _variables(buf, where), where)
    _check_whisper(t)
    if not t.count_layers("encoder") or not t.count_layers("decoder"):
        raise ValueError(f"{where}: encoder/layer_0 or decoder/layer_0 is missing (not a Whisper model this "
                         f"reader knows)")
    out: dict[str, np.ndarray] = {}
    for stack in ("encoder", "decoder"):
        hf = f"model.{stack}"
        out[f"{hf}.embed_positions.weight"] = t.raw(f"{stack}/position_encodings/encodings")
        _norm(t, f"{stack}/layer_norm", f"{hf}.layer_norm", out)
        for i in range(t.count_layers(stack)):
            _layer(t, f"{stack}/layer_{i}", f"{hf}.layers.{i}", stack == "decoder", out)
    for conv in ("conv1", "conv2"):
        _linear(t, f"encoder/{conv}", f"model.encoder.{conv}", out)
    out["model.decoder.embed_tokens.weight"] = t.weight("decoder/embeddings/weight")
    config = {
        "vocab_size": out["model.decoder.embed_tokens.weight"].shape[0],
        "num_mel_bins": out["model.encoder.conv1.weight"].shape[1],
        "d_model": out["model.encoder.conv1.weight"].shape[0],
        "encoder_layers": t.count_layers("encoder"),
        "encoder_attention_heads": t.scalar("encoder/num_heads"),
        "encoder_ffn_dim": out["model.encoder.layers.0.fc1.weight"].shape[0],
        "decoder_layers": t.count_layers("decoder"),
        "decoder_attention_heads": t.scalar("decoder/num_heads"),
        "decoder_ffn_dim": out["model.decoder.layers.0.fc1.weight"].shape[0],
        "max_source_positions": out["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": out["model.decoder.embed_positions.weight"].shape[0],
    }
    # NOTE: a tensor variable nobody mapped means a layout this reader does not know: refuse, don't drop it
    left = sorted(n for n, v in t.vars.items() if v.shape and n not in t.used)
    if left:
        raise ValueError(f"{where}: variables this reader does not map: {', '.join(left[:5])}"
                         f"{' ...' if len(left) > 5 else ''}")
    tensors = {name: torch.from_numpy(value) for name, value in out.items()}
    return config, {name: x.view(torch.bfloat16) if x.dtype == torch.uint16 else x for name, x in tensors.items()}
