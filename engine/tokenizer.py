"""Text <-> token ids: a Rust `tokenizers.Tokenizer` built from a Hugging Face directory or GGUF metadata."""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from engine.chat_template import render_chat_template

# llama.cpp's `tokenizer.ggml.token_type` values.
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 2, 3, 4

# Pre-tokenizer split patterns, by the family llama.cpp names in `tokenizer.ggml.pre`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gpt2() -> pre_tokenizers.PreTokenizer:
    # ByteLevel's built-in regex is GPT-2's.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    # StarCoder-style vocabularies (SmolLM's too) were trained with every digit on its own.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


_PRE_TOKENIZERS = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "phi-2", "roberta-bpe"), _gpt2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    _digits_then_gpt2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"),
                    lambda: _split_then_bytes(_LLAMA3_SPLIT)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), lambda: _split_then_bytes(_QWEN2_SPLIT)),
}
# Families whose reference tokenizer.json looks a whole word up before merging (llama.cpp does the same).
_IGNORE_MERGES = frozenset(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"))


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, an AddedToken dict, or null."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _bos_eos_processor(bos: str | None, eos: str | None, backend: _Backend) -> processors.TemplateProcessing:
    """A post-processor that wraps each sequence in bos/eos (either may be None)."""
    head = [f"{bos}:0"] if bos else []
    tail = [f"{eos}:0"] if eos else []
    specials = [(t, backend.token_to_id(t)) for t in {bos, eos} - {None}]
    return processors.TemplateProcessing(single=" ".join(head + ["$A:0"] + tail),
                                         pair=" ".join(head + ["$A:0"] + tail + head + ["$B:1"] + tail),
                                         special_tokens=specials)


class Tokenizer:
    """Encodes, decodes and knows the model's special tokens and chat template."""

    def __init__(self, backend: _Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None,
                 extra_eos_token_ids: Iterable[int] = (), chat_template: str | None = None,
                 model_max_length: int | None = None) -> None:
        # NOTE: a tokenizer.json may carry training-time padding/truncation; serving wants neither.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = self._id_of(bos_token)
        self.eos_token_id = self._id_of(eos_token)
        self.pad_token_id = self._id_of(pad_token)
        self.unk_token_id = self._id_of(unk_token)
        eos_ids = {i for i in (self.eos_token_id, *extra_eos_token_ids) if i is not None}
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        named = (self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id)
        self.all_special_ids: list[int] = sorted(special | {i for i in named if i is not None})

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json plus the sidecar configs of a Hugging Face model directory."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        backend = _Backend.from_file(str(path / "tokenizer.json"))
        config = _read_json(path / "tokenizer_config.json")
        # special_tokens_map.json wins over tokenizer_config.json, as in transformers.
        tokens = {k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        for key, value in _read_json(path / "special_tokens_map.json").items():
            if key in tokens:
                tokens[key] = _token_content(value)
        if "add_bos_token" in config or "add_eos_token" in config:
            # An explicit flag overrides the post-processor tokenizer.json ships with.
            bos = tokens["bos_token"] if config.get("add_bos_token") else None
            eos = tokens["eos_token"] if config.get("add_eos_token") else None
            backend.post_processor = _bos_eos_processor(bos, eos, backend)
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        extra_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos] if isinstance(gen_eos, int) else []
        max_len = config.get("model_max_length")
        return cls(backend, **tokens, extra_eos_token_ids=extra_eos, chat_template=_dir_chat_template(path, config),
                   model_max_length=int(max_len) if max_len is not None else None)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata values (`{k: f.contents() for k, f in GGUFReader(p).fields.items()}`)."""
        kind = meta.get("tokenizer.ggml.model")
        tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
        types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        if kind == "gpt2":
            backend, add_bos_default = _byte_level_bpe(meta, vocab), False
        elif kind == "llama":
            backend, add_bos_default = _sentencepiece_bpe(meta, tokens, types, vocab), True
        else:
            raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'gpt2', 'llama')")
        # Control tokens stay whole and are skippable on decode; user-defined ones stay whole but are text.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types)
                                    if k in (_TOKEN_CONTROL, _TOKEN_UNKNOWN)])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types)
                            if k == _TOKEN_USER_DEFINED])

        def token(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        backend.post_processor = _bos_eos_processor(bos if add_bos else None, eos if add_eos else None, backend)
        # End-of-turn / end-of-message ids also end generation (llama.cpp's "end of generation" set).
        extra_eos = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        arch = meta.get("general.architecture")
        ctx = meta.get(f"{arch}.context_length")
        return cls(backend, bos_token=bos, eos_token=eos, pad_token=token("padding_token_id"),
                   unk_token=token("unknown_token_id"), extra_eos_token_ids=extra_eos,
                   chat_template=meta.get("tokenizer.chat_template"),
                   model_max_length=int(ctx) if ctx is not None else None)

    # ------------------------------------------------------------------ API

    @property
    def backend(self) -> _Backend:
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_pair(self, text: str, pair: str | None = None,
                    max_length: int | None = None) -> tuple[list[int], list[int]]:
        """(ids, token type ids) of a text or a pair with the post-processor's special tokens, as
        transformers' tokenizer(text, pair, truncation=True, max_length=...) gives: over max_length, the
        longer side loses tokens from its end first (longest_first); special tokens are kept."""
        first = self._backend.encode(text, add_special_tokens=False)
        second = None if pair is None else self._backend.encode(pair, add_special_tokens=False)
        if max_length is not None:
            budget = max(max_length - self._backend.num_special_tokens_to_add(pair is not None), 0)
            if second is None:
                first.truncate(budget)
            elif len(first.ids) + len(second.ids) > budget:
                n1, n2 = _longest_first(len(first.ids), len(second.ids), budget)
                first.truncate(n1)
                second.truncate(n2)
        out = self._backend.post_process(first, second, add_special_tokens=True)
        return out.ids, out.type_ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
                            add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render `messages` (OpenAI-style dicts) with the model's template, as transformers would."""
        template = kwargs.pop("chat_template", None) or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template")
        named = {"unk_token": self.unk_token, "pad_token": self.pad_token}
        extra = {k: v for k, v in named.items() if v is not None} | kwargs
        return render_chat_template(template, list(messages), tools=tools,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)


# ---------------------------------------------------------------------- helpers

def _longest_first(n1: int, n2: int, budget: int) -> tuple[int, int]:
    """The lengths tokenizers' LongestFirst truncation keeps: the shorter text keeps what it can up to
    half the budget, the longer one the rest (it gets the odd token when both are cut)."""
    short, long_ = min(n1, n2), max(n1, n2)
    long_ = short if short > budget else max(short, budget - short)
    if short + long_ > budget:
        short, long_ = budget // 2, budget // 2 + budget % 2
    return (long_, short) if n1 > n2 else (short, long_)



def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _dir_chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja, else chat_template.json, else tokenizer_config.json."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def _merges(meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]


def _byte_level_bpe(meta: Mapping[str, Any], vocab: dict[str, int]) -> _Backend:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: {sorted(_PRE_TOKENIZERS)})")
    backend = _Backend(models.BPE(vocab, _merges(meta), ignore_merges=pre in _IGNORE_MERGES))
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int],
                       vocab: dict[str, int]) -> _Backend:
    """SentencePiece BPE with byte fallback: '▁' marks spaces, <0xNN> tokens spell unknown bytes."""
    if "tokenizer.ggml.merges" in meta:
        merges = _merges(meta)
    else:
        merges = _merges_from_scores(tokens, types, list(meta["tokenizer.ggml.scores"]))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    backend = _Backend(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", split=False,
                                                     prepend_scheme="first" if add_prefix else "never")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    return backend


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece stores no merges: every split of a piece into two pieces is a merge, ranked by the
    merged piece's score (higher merges first), which is the order SentencePiece's BPE applies them."""
    normal = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k in (_TOKEN_NORMAL, _TOKEN_USER_DEFINED)}
    ranked = []
    for piece, i in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, normal[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
