"""GGUF files: metadata, a Hugging Face-style config, and tensors under Hugging Face parameter names."""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Iterator

from typing import TYPE_CHECKING

from engine.gguf_types import QUANT_SIZES, QT, SUPPORTED_QTYPES, type_name

# NOTE: no numpy either: the server process reads a header (the tokenizer) and would load numpy only for that
if TYPE_CHECKING:   # torch only where tensors are read: the server reads headers (the tokenizer) without it
    import torch

    from kernels.cpu_quant import QuantizedTensor

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# model_type, HF class; llama.cpp stores Mistral models as "llama" (told apart by general.name).
ARCHITECTURES = {"llama": ("llama", "LlamaForCausalLM"), "qwen2": ("qwen2", "Qwen2ForCausalLM"),
                 "qwen3": ("qwen3", "Qwen3ForCausalLM")}
MISTRAL = ("mistral", "MistralForCausalLM")

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors llama.cpp adds that have no Hugging Face parameter (Llama 3 rope factors: see read_tensor).
_SKIPPED = {"rope_freqs.weight"}

# GGUF metadata value types: id -> struct format (8 = string, 9 = array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(Exception):
    """A GGUF file cannot be used; the one-line message names the file and the problem."""


class _Truncated(Exception):
    pass


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor; None for tensors HF has no parameter for."""
    if gguf_name in _SKIPPED:
        return None
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix == "weight":
        return f"{_GLOBAL_NAMES[stem]}.weight"
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m is None or m[2] not in _LAYER_NAMES:
        raise KeyError(gguf_name)
    return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str                 # GGUF name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]    # torch order (GGUF lists dims innermost first; this is reversed)
    qtype: int                # gguf.GGMLQuantizationType
    offset: int               # absolute byte offset of the data in the file
    num_bytes: int


@dataclass(frozen=True, slots=True)
class GGUFFile:
    path: str
    metadata: dict[str, Any]                  # key -> str/int/float/bool/list, as gguf's field.contents()
    architecture: str                         # general.architecture
    tensor_infos: tuple[GGUFTensorInfo, ...]  # in file order
    _data: mmap.mmap = field(repr=False, compare=False)   # the whole file, mapped copy-on-write

    def _key(self, name: str, default: Any = None, required: bool = False) -> Any:
        key = f"{self.architecture}.{name}"
        if key not in self.metadata and required:
            raise GGUFError(f"{self.path}: missing metadata key {key}")
        return self.metadata.get(key, default)

    def forget_decoded_strings(self) -> None:
        """Decoded string arrays (vocabulary, merges) go back to their undecoded form; see LazyStrings.forget."""
        for value in self.metadata.values():
            if isinstance(value, LazyStrings):
                value.forget()

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face config.json-style dict for this model."""
        names = {t.name for t in self.tensor_infos}
        model_type, hf_class = ARCHITECTURES[self.architecture]
        if self.architecture == "llama" and "mistral" in str(self.metadata.get("general.name", "")).lower():
            model_type, hf_class = MISTRAL
        hidden = int(self._key("embedding_length", required=True))
        heads = int(self._key("attention.head_count", required=True))
        vocab = self._key("vocab_size")
        if vocab is None:
            tokens = self.metadata.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens else self._info("token_embd.weight").shape[0]
        config = {
            "model_type": model_type,
            "architectures": [hf_class],
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._key("feed_forward_length", required=True)),
            "num_hidden_layers": int(self._key("block_count", required=True)),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._key("attention.head_count_kv", heads)),
            "head_dim": int(self._key("attention.key_length", hidden // heads)),
            "hidden_act": "silu",
            "rms_norm_eps": float(self._key("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._key("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._key("context_length", required=True)),
            "rope_scaling": self._rope_scaling(),
            "tie_word_embeddings": "output.weight" not in names,
            # Qwen2 always has q/k/v biases; the others only when the file carries them.
            "attention_bias": self.architecture == "qwen2" or "blk.0.attn_q.bias" in names,
            "torch_dtype": self._float_dtype(),
        }
        if model_type == "mistral":
            # llama.cpp runs these as llama, with full attention; HF's MistralConfig would default to a window.
            config["sliding_window"] = None
        for key, gguf_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
            if (token_id := self.metadata.get(f"tokenizer.ggml.{gguf_key}_token_id")) is not None:
                config[f"{key}_token_id"] = int(token_id)
        return config

    def _info(self, name: str) -> GGUFTensorInfo:
        for info in self.tensor_infos:
            if info.name == name:
                return info
        raise GGUFError(f"{self.path}: no tensor {name}")

    def _float_dtype(self) -> str:
        # Quantized weights dequantize in float32; a file of 16-bit floats says which 16-bit type it was.
        qtypes = {t.qtype for t in self.tensor_infos}
        return "bfloat16" if QT.BF16 in qtypes else "float16" if QT.F16 in qtypes else "float32"

    def _rope_scaling(self) -> dict[str, Any] | None:
        kind, factor = self._key("rope.scaling.type"), self._key("rope.scaling.factor")
        if kind in (None, "none") or factor is None:
            # NOTE: llama.cpp writes Llama 3.x rope scaling as the rope_freqs.weight tensor, not as
            # keys; read it with read_tensor("rope_freqs.weight") (frequencies are divided by it).
            return None
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        original = self._key("rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        optional = {"yarn": {"attn_factor": "attention_factor", "yarn_beta_fast": "beta_fast",
                             "yarn_beta_slow": "beta_slow"},
                    "llama3": {"low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor"}}
        for gguf_key, hf_key in optional.get(kind, {}).items():
            if (value := self._key(f"rope.scaling.{gguf_key}")) is not None:
                scaling[hf_key] = float(value)
        return scaling

    def read_tensor(self, gguf_name: str, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        """One tensor by its GGUF name, dequantized (float32 unless dtype), in torch order, exactly as stored
        (no renaming)."""
        return self._decode(self._info(gguf_name), dtype)

    def _decode(self, info: GGUFTensorInfo, dtype: "torch.dtype | None") -> "torch.Tensor":
        import torch

        from engine.dequant import dequantize
        raw = torch.frombuffer(self._data, dtype=torch.uint8, count=info.num_bytes, offset=info.offset)
        return dequantize(raw, info.qtype, info.shape, torch.float32 if dtype is None else dtype)

    def iter_tensors(self, dtype: "torch.dtype | None" = None,
                     skip: set[str] | frozenset[str] = frozenset()) -> Iterator[tuple[str, "torch.Tensor"]]:
        """(Hugging Face name, tensor in `dtype` with HF's shape), in file order, one tensor at a time;
        names in `skip` are passed over unread."""
        for info, hf_name, heads in self._hf_tensors():
            if hf_name in skip:
                continue
            tensor = self._decode(info, dtype)
            yield hf_name, tensor if heads is None else _unpermute_rotary(tensor, heads)

    def iter_quantized(self) -> Iterator[tuple[str, "QuantizedTensor"]]:
        """(Hugging Face name, integer form) of each 2-D tensor whose type the CPU kernel reads
        (kernels/cpu_quant.py), rows in HF's order; other tensors are skipped."""
        import torch

        from engine.dequant import split_quantized
        from kernels.cpu_quant import QuantizedTensor
        for info, hf_name, heads in self._hf_tensors():
            raw = torch.frombuffer(self._data, dtype=torch.uint8, count=info.num_bytes, offset=info.offset)
            w = split_quantized(raw, info.qtype, info.shape)
            if w is None:
                continue
            if heads is not None:  # row order is all the un-permute changes; the groups run along rows
                w = QuantizedTensor(*(t if t is None else _unpermute_rotary(t, heads)
                                      for t in (w.q, w.scale, w.zero)), w.bits)
            yield hf_name, w

    def _hf_tensors(self) -> Iterator[tuple[GGUFTensorInfo, str, int | None]]:
        """(info, HF name, head count whose rotary rows to un-permute or None) per mapped tensor."""
        config = self.hf_config() if self.architecture == "llama" else None
        for info in self.tensor_infos:
            hf_name = hf_tensor_name(info.name)
            if hf_name is None:
                continue
            heads = None
            if config is not None and info.name.split(".")[-2] in ("attn_q", "attn_k"):
                heads = config["num_attention_heads" if ".attn_q." in info.name else "num_key_value_heads"]
            yield info, hf_name, heads


def _unpermute_rotary(w: "torch.Tensor", num_heads: int) -> "torch.Tensor":
    """Undo llama.cpp's q/k row order for its interleaved rotary, back to HF's rotate-half order."""
    # llama.cpp's converter viewed each head's rows as [2, head_dim/2] and swapped those two axes;
    # viewing the GGUF rows of a head as [head_dim/2, 2] and swapping again restores HF's order.
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class _Cursor:
    """Sequential little-endian reads over the mapped header; any read past the end is a truncation."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Truncated
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return str(self.take(self.scalar("<Q")), "utf-8")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        item_type, count = self.scalar("<I"), self.scalar("<Q")
        if item_type in _SCALARS:  # numeric arrays in one go: token types, scores
            fmt = f"<{count}{_SCALARS[item_type][1:]}"
            return list(struct.unpack(fmt, self.take(struct.calcsize(fmt))))
        if item_type == _STRING:
            start, self.pos = self.pos, _skip_strings(self.buf, self.pos, count)
            return LazyStrings(self.buf, start, count)
        return [self.value(item_type) for _ in range(count)]


_unpack_len = struct.Struct("<Q").unpack_from


def _skip_strings(buf: memoryview, pos: int, count: int) -> int:
    """The offset past `count` length-prefixed strings from pos (the hot loop of a header: vocab and merges
    are ~100k strings, so it avoids method calls)."""
    size = len(buf)
    for _ in range(count):
        if pos + 8 > size:
            raise _Truncated
        pos += 8 + _unpack_len(buf, pos)[0]
        if pos > size:
            raise _Truncated
    return pos


class LazyStrings(Sequence):
    """A string array of the header (a vocabulary, merges), decoded on first use: the engine reads a GGUF's
    header for the model's shape and never needs its ~100k tokenizer strings (~0.1 s to decode) unless a
    request asks for structured output; the server's tokenizer reads them all. Compares equal to the list."""

    def __init__(self, buf: memoryview, start: int, count: int):
        self._buf, self._start, self._count = buf, start, count
        self._items: list[str] | None = None

    def _decoded(self) -> list[str]:
        if self._items is None:
            buf, pos, out = self._buf, self._start, []
            for _ in range(self._count):
                (n,) = _unpack_len(buf, pos)
                pos += 8
                out.append(str(buf[pos:pos + n], "utf-8"))   # UnicodeDecodeError (a ValueError) on bad bytes
                pos += n
            self._items = out
        return self._items

    def forget(self) -> None:
        """Drop the decoded strings (they decode again if asked): a header kept in a cache then holds ~1 MB
        of file offsets, not ~9 MB of Python strings its one reader (the tokenizer build) has copied."""
        self._items = None

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        return self._decoded()[index]

    def __iter__(self):
        return iter(self._decoded())

    def __eq__(self, other) -> bool:
        return list(self) == list(other) if isinstance(other, (list, tuple, LazyStrings)) else NotImplemented

    def __repr__(self) -> str:
        return repr(self._decoded())

    def __reduce__(self):   # pickles (and copies) as the plain list: the buffer is this process's file map
        return list, (self._decoded(),)


def _parse(path: str, data: mmap.mmap) -> GGUFFile:
    cur = _Cursor(memoryview(data))
    if bytes(cur.take(4)) != GGUF_MAGIC:
        raise ValueError("not a GGUF file (bad magic)")
    version = cur.scalar("<I")
    if version & 0xFFFF == 0:
        raise ValueError("big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    num_tensors, num_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    raw_infos = []
    for _ in range(num_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        raw_infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    infos = []
    for name, dims, qtype, offset in raw_infos:
        if qtype not in SUPPORTED_QTYPES:
            raise ValueError(f"tensor {name} has unsupported quantization {type_name(qtype)}")
        block_size, type_size = QUANT_SIZES[qtype]
        num_elements = math.prod(dims)
        if dims and dims[0] % block_size:
            raise ValueError(f"tensor {name}: row length {dims[0]} is not a multiple of {block_size}")
        info = GGUFTensorInfo(name, tuple(reversed(dims)), qtype, data_start + offset,
                              num_elements // block_size * type_size)
        if info.offset + info.num_bytes > len(data):
            raise _Truncated
        infos.append(info)
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r} (supported: {', '.join(ARCHITECTURES)})")
    for info in infos:
        try:
            hf_tensor_name(info.name)
        except KeyError:
            raise ValueError(f"unexpected tensor {info.name} for architecture {architecture}") from None
    return GGUFFile(path, metadata, architecture, tuple(infos), data)


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Map a GGUF file and read its header; tensors are decoded later, by iter_tensors."""
    path = str(path)
    try:
        # Copy-on-write: tensors may alias the map writably (torch wants that) without touching the file.
        with open(path, "rb") as f:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:  # missing, unreadable, or empty (ValueError: cannot mmap empty)
        raise GGUFError(f"{path}: cannot map file: {e}") from e
    try:
        return _parse(path, data)
    except _Truncated:
        raise GGUFError(f"{path}: truncated GGUF file ({len(data)} bytes)") from None
    except (ValueError, struct.error) as e:  # UnicodeDecodeError is a ValueError
        raise GGUFError(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
