"""engine.tokenizer against transformers: the default GGUF, pre-tokenizer families, SentencePiece GGUFs, HF dirs."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.tokenizer import Tokenizer

TEXTS = [
    "", "Hello world", "Hello, world! How's it going?", "don't I'LL we've they'd", " leading space",
    "trailing space ", "  two leading", "a  b   c    d", "line1\nline2\n\nline4\n", "\n\n\n", "\t\ttabs\tand spaces  \t",
    " \n \r\n x", "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] = b[i]; }",
    "<html><body class=\"x\">&amp;</body></html>", "12345 abc 1234567", "3.14159 -42 1e10 0x1F", "2024-01-31T23:59:59Z",
    "a1b2c3", "naïve café résumé Ångström", "Straße Œuvre ñandú", "😀👍🏽 emoji 🇫🇷 👨‍👩‍👧", "中文字符测试，日本語のテキスト",
    "한국어 텍스트", "Привет, мир!", "مرحبا بالعالم", "...!!!???---___", "HTTPServer getHTTPResponseCode snake_case",
    "<|im_start|>user\nhi<|im_end|>\n", "x<|im_end|>y", "<|endoftext|>tail", "<|im_start|><|im_end|>",
    "mixed 中文 and English 123 😀", "\u00a0non-breaking\u2009thin\u200bzero-width", "a" * 300,
]


def _meta(path: str | Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


def _write_gguf(path: Path, kv: dict) -> None:
    """A GGUF with llama-architecture metadata, the given tokenizer keys, and one dummy tensor."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1); w.add_context_length(64); w.add_embedding_length(8); w.add_feed_forward_length(16)
    w.add_head_count(2); w.add_head_count_kv(1); w.add_layer_norm_rms_eps(1e-5)
    for key, value in kv.items():
        w.add_key_value(key, value[0], value[1], sub_type=value[2] if len(value) > 2 else None)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


V = gguf.GGUFValueType


@pytest.fixture(scope="module")
def smol_meta(default_gguf_path: str) -> dict:
    return _meta(default_gguf_path)


@pytest.fixture(scope="module")
def ours(smol_meta: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smol_meta)


@pytest.fixture(scope="module")
def ref(default_gguf_path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(default_gguf_path),
                                         gguf_file=os.path.basename(default_gguf_path))


# ---------------------------------------------------------------- the default model (gpt2 BPE, pre 'smollm')


@pytest.mark.parametrize("text", TEXTS)
def test_default_gguf_encode_decode_match_transformers(ours: Tokenizer, ref, text: str) -> None:
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


def test_default_gguf_batch_and_random_ids(ours: Tokenizer, ref) -> None:
    assert ours.encode_batch(TEXTS) == [ref.encode(t) for t in TEXTS]
    rng = np.random.default_rng(0)
    for _ in range(50):  # arbitrary ids, including partial UTF-8 byte tokens and specials
        ids = rng.integers(0, ours.vocab_size, size=int(rng.integers(1, 40))).tolist()
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_default_gguf_vocab_and_special_tokens(ours: Tokenizer, ref, smol_meta: dict) -> None:
    assert ours.vocab_size == len(ref) == len(smol_meta["tokenizer.ggml.tokens"])
    assert (ours.bos_token, ours.eos_token) == (ref.bos_token, ref.eos_token)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                         ref.pad_token_id)
    assert ours.unk_token_id == ref.unk_token_id
    assert set(ref.all_special_ids) <= set(ours.all_special_ids)
    assert set(ours.all_special_ids) == {i for i, t in ref.added_tokens_decoder.items() if t.special}
    assert ours.eos_token_ids == frozenset({smol_meta["tokenizer.ggml.eos_token_id"]})
    # Control tokens are one id each, wherever they appear in the text.
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert ours.encode(f"a{name}b")[1:2] == [ours.token_to_id(name)]
    assert ours.encode("hi")[0] != ours.bos_token_id  # the file says add_bos_token = False


def test_default_gguf_chat_template_and_context(ours: Tokenizer, ref, smol_meta: dict) -> None:
    assert ours.chat_template == smol_meta["tokenizer.chat_template"]
    assert ours.model_max_length == smol_meta["llama.context_length"]
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    for gen in (True, False):
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == ref.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=gen)


# ---------------------------------------------------------------- other byte-level pre-tokenizer families


@pytest.fixture(scope="module")
def small_bpe(smol_meta: dict) -> dict:
    """The first 3000 tokens of SmolLM's vocabulary and the merges among them: a real BPE, small to write."""
    tokens = smol_meta["tokenizer.ggml.tokens"][:3000]
    keep = set(tokens)
    merges = [m for m in smol_meta["tokenizer.ggml.merges"]
              if (pair := m.split(" ")) and pair[0] in keep and pair[1] in keep and "".join(pair) in keep]
    return {"tokens": tokens, "types": smol_meta["tokenizer.ggml.token_type"][:3000], "merges": merges}


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "default", "smollm"])
def test_pre_tokenizer_families_match_transformers(tmp_path: Path, small_bpe: dict, pre: str) -> None:
    from transformers import AutoTokenizer
    _write_gguf(tmp_path / "t.gguf", {
        "tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": (pre, V.STRING),
        "tokenizer.ggml.tokens": (small_bpe["tokens"], V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (small_bpe["types"], V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (small_bpe["merges"], V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32), "tokenizer.ggml.eos_token_id": (2, V.UINT32),
        "tokenizer.ggml.add_bos_token": (True, V.BOOL),
    })
    ours = Tokenizer.from_gguf_metadata(_meta(tmp_path / "t.gguf"))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == ours.bos_token_id == 1
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_unsupported_tokenizers_are_named(small_bpe: dict) -> None:
    base = {"tokenizer.ggml.tokens": small_bpe["tokens"], "tokenizer.ggml.merges": small_bpe["merges"]}
    with pytest.raises(ValueError, match="'bert'"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="'no-such-pre'"):
        Tokenizer.from_gguf_metadata({**base, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "no-such-pre"})


# ---------------------------------------------------------------- SentencePiece ('llama') GGUF


SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "t", "i", "n", "s", "c", "!", "he", "ll", "llo", "hello",
              "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "in", "▁t", "th", "▁th", "▁the", "▁a", "at", "▁cat", "ca"]


def spm_gguf_kv() -> dict:
    """A tiny SentencePiece vocabulary: unk/bos/eos, 256 byte tokens, pieces scored longer-first, 2 added tokens."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES + ["<|user|>", "<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [3, 4]
    scores = [0.0] * 259 + [-100.0 + 10 * len(p) - 0.01 * i for i, p in enumerate(SPM_PIECES)] + [0.0, 0.0]
    return {"tokenizer.ggml.model": ("llama", V.STRING), "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
            "tokenizer.ggml.scores": (scores, V.ARRAY, V.FLOAT32),
            "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
            "tokenizer.ggml.bos_token_id": (1, V.UINT32), "tokenizer.ggml.eos_token_id": (2, V.UINT32),
            "tokenizer.ggml.unknown_token_id": (0, V.UINT32)}


SPM_TEXTS = ["hello world", "the cat", "héllo 中!", " leading", "  two  spaces ", "", "a<|user|>b <think> c",
             "\n", "hello\nworld", "😀 whole emoji", "cat" * 20]


def test_sentencepiece_gguf_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoTokenizer
    _write_gguf(tmp_path / "spm.gguf", spm_gguf_kv())
    ours = Tokenizer.from_gguf_metadata(_meta(tmp_path / "spm.gguf"))
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert ours.vocab_size == len(ref)
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ids[0] == ours.bos_token_id  # sentencepiece GGUFs add bos unless they say otherwise
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        if not text.startswith(" "):  # an existing leading space stands in for the prepended one
            assert ours.decode(ids) == text.replace("<|user|>", "")
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_sentencepiece_byte_fallback_and_added_tokens(tmp_path: Path) -> None:
    _write_gguf(tmp_path / "spm.gguf", spm_gguf_kv())
    tok = Tokenizer.from_gguf_metadata(_meta(tmp_path / "spm.gguf"))
    # '中' is not a piece: it falls back to its three UTF-8 bytes, and decodes back whole.
    ids = tok.encode("中", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == ["▁", "<0xE4>", "<0xB8>", "<0xAD>"]
    assert tok.decode(ids) == "中"
    assert tok.decode(ids[:-1]) == "\ufffd" * 2  # bytes of an unfinished character: one U+FFFD each
    assert tok.encode("▁hello", add_special_tokens=False) == tok.encode("hello", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(tok.encode("hello world", add_special_tokens=False)) == ["▁hello", "▁world"]
    # Control tokens are special (skipped on decode); user-defined ones are text.
    ids = tok.encode("<|user|><think>", add_special_tokens=False)
    assert ids == [tok.token_to_id("<|user|>"), tok.token_to_id("<think>")]
    assert tok.decode(ids) == "<think>" and tok.decode(ids, skip_special_tokens=False) == "<|user|><think>"
    assert tok.token_to_id("<|user|>") in tok.all_special_ids and tok.token_to_id("<think>") not in tok.all_special_ids


# ---------------------------------------------------------------- Hugging Face directories


def test_minilm_dir_matches_transformers(minilm_dir: str) -> None:
    from transformers import AutoTokenizer
    ours, ref = Tokenizer.from_dir(minilm_dir), AutoTokenizer.from_pretrained(minilm_dir)
    for text in TEXTS + ["[CLS] inline [SEP] and [MASK]", "word " * 200]:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text  # [CLS] ... [SEP], and no truncation/padding from tokenizer.json
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert len(ours.encode("word " * 200)) == 202
    assert ours.vocab_size == len(ref)
    assert ours.all_special_ids == sorted(ref.all_special_ids)
    assert (ours.pad_token_id, ours.unk_token_id) == (ref.pad_token_id, ref.unk_token_id)
    assert ours.model_max_length == ref.model_max_length == 512
    assert ours.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_dir_configs(tmp_path: Path, minilm_dir: str) -> None:
    """AddedToken dicts, explicit add_bos/add_eos, named templates, chat_template.jinja, generation_config eos."""
    from transformers import AutoTokenizer
    shutil.copy(Path(minilm_dir) / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 77,
              "bos_token": {"__type": "AddedToken", "content": "[CLS]", "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False, "special": True},
              "eos_token": "[SEP]", "pad_token": "[PAD]", "add_bos_token": True, "add_eos_token": False,
              "chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [102, 100]}))
    ours, ref = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in ("hello world", "", "[SEP] inside"):
        # NOTE: explicit add_bos/add_eos flags override tokenizer.json's [CLS] $A [SEP] post-processor, as
        # transformers 4.x's Llama/Gemma tokenizers did; transformers 5's generic backend ignores the flags.
        assert ours.encode(text) == [101] + ref.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert (ours.bos_token, ours.eos_token, ours.bos_token_id, ours.eos_token_id) == ("[CLS]", "[SEP]", 101, 102)
    assert ours.eos_token_ids == frozenset({100, 102})
    assert ours.model_max_length == 77
    assert ours.chat_template == ref.chat_template["default"] == "{{ bos_token }}{{ messages[0]['content'] }}"
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "[CLS]hi"
    # A chat_template.jinja beside the config takes precedence over it.
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_dir(tmp_path).chat_template == AutoTokenizer.from_pretrained(tmp_path).chat_template
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "J1"
