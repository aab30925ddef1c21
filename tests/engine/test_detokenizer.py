"""IncrementalDetokenizer and StopStringMatcher on the default model's tokenizer and a SentencePiece one."""
from __future__ import annotations

import random

import gguf
import pytest

from engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from engine.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! This is a plain sentence.", "😀👍🏽 emoji 🇫🇷 👨‍👩‍👧 and more 🎉🎉", "中文字符测试，日本語のテキスト、한국어",
    "naïve café résumé Ångström Straße", "def f(x):\n    return {'k': x ** 2}\n\n\n", "   spaces   and\ttabs\n",
    "<|im_start|>assistant\nSure<|im_end|>", "mixed 中文 and English 123 😀 done", "Привет, мир! مرحبا", "",
]


@pytest.fixture(scope="module")
def tok(default_gguf_path: str) -> Tokenizer:
    meta = {k: f.contents() for k, f in gguf.GGUFReader(default_gguf_path).fields.items()}
    return Tokenizer.from_gguf_metadata(meta)


def _stream(tok, prompt_ids: list[int], ids: list[int], chunks: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip)
    pieces, at = [], 0
    for size in chunks:
        pieces.append(detok.push(ids[at:at + size]))
        at += size
    assert at >= len(ids)
    pieces.append(detok.flush())
    return pieces


def _random_chunks(rng: random.Random, n: int) -> list[int]:
    chunks = []
    while sum(chunks) < n:
        chunks.append(rng.choice([1, 1, 1, 2, 3, 5]))
    return chunks


@pytest.mark.parametrize("skip", [True, False])
def test_real_text_streams_to_decode(tok: Tokenizer, skip: bool) -> None:
    rng = random.Random(0)
    prompt = tok.encode("<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n")
    for text in TEXTS:
        ids = tok.encode(text)
        expected = tok.decode(ids, skip_special_tokens=skip)
        for chunks in ([1] * len(ids), _random_chunks(rng, len(ids))):
            pieces = _stream(tok, prompt, ids, chunks, skip)
            assert "".join(pieces) == expected
            # Never half a character: no piece ends in U+FFFD for valid text, and nothing is held at the end.
            assert not any(p.endswith("\ufffd") for p in pieces) and pieces[-1] == ""


def test_multibyte_characters_are_held_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("🎉")
    assert len(ids) > 1 and tok.decode(ids[:1]).endswith("\ufffd")  # the emoji really is split across tokens
    detok = IncrementalDetokenizer(tok, [])
    assert [detok.push([i]) for i in ids] == [""] * (len(ids) - 1) + ["🎉"]


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_stream_to_decode(tok: Tokenizer, skip: bool) -> None:
    """Arbitrary ids, including lone UTF-8 continuation bytes, specials and invalid sequences."""
    rng = random.Random(1)
    byte_tokens = [tok.token_to_id(t) for t in tok.convert_ids_to_tokens(range(tok.vocab_size))
                   if len(t) == 1]  # single byte-level symbols, many of them partial UTF-8
    for _ in range(200):
        n = rng.randint(1, 60)
        ids = [rng.choice(byte_tokens) if rng.random() < 0.5 else rng.randrange(tok.vocab_size) for _ in range(n)]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 8))]
        pieces = _stream(tok, prompt, ids, _random_chunks(rng, n), skip)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)


def test_window_stays_small(tok: Tokenizer) -> None:
    """Each push decodes a short window, not the whole output."""

    class Counting:
        def __init__(self) -> None:
            self.longest = 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    counting = Counting()
    ids = tok.encode(" ".join(TEXTS) * 20)
    assert len(ids) > 2000
    detok = IncrementalDetokenizer(counting, tok.encode("prompt " * 100))
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids)
    assert counting.longest <= 12
    # Skipped special tokens add no text; a long run of them must not grow the window either.
    ids = tok.encode("a" + "<|im_end|>" * 500 + " b 😀")
    detok = IncrementalDetokenizer(counting, [])
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids) == "a b 😀"
    assert counting.longest <= 20


def test_sentencepiece_continuation_keeps_leading_space() -> None:
    """The first output token reads as a continuation of the prompt, not as the start of a text."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "hello", "▁hello", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [float(len(p)) for p in pieces],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    spm = Tokenizer.from_gguf_metadata(meta)
    prompt, out = spm.encode("hello"), spm.encode(" world 中", add_special_tokens=False)
    assert spm.decode(out) == "world 中"  # decoding the output alone strips the prefix space...
    text = "".join(_stream(spm, prompt, out, [1] * len(out)))
    assert text == " world 中"  # ...streaming after the prompt keeps it
    assert text == spm.decode(prompt + out)[len(spm.decode(prompt)):]


# ---------------------------------------------------------------- stop strings


def _feed(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, str | None]:
    out = []
    for piece in pieces:
        text, stopped, stop = matcher.push(piece)
        out.append(text)
        if stopped:
            return "".join(out), stop
    return "".join(out) + matcher.flush(), None


def test_stop_spanning_pieces() -> None:
    m = StopStringMatcher(["</answer>"])
    assert m.push("The answer is 4</ans") == ("The answer is 4", False, None)  # "</ans" held back
    assert m.push("wer> trailing") == ("", True, "</answer>")
    assert m.stopped and m.push("more") == ("", True, "</answer>")
    m = StopStringMatcher(["</answer>"], include_stop_str_in_output=True)
    assert _feed(m, ["4<", "/", "answer", ">", "x"]) == ("4</answer>", "</answer>")


def test_false_prefix_is_released() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.push("go ST") == ("go ", False, None)
    assert m.push("ART") == ("START", False, None)
    assert m.push("S") == ("", False, None)
    assert m.flush() == "S"


def test_earliest_stop_wins_and_no_stops_pass_through() -> None:
    assert _feed(StopStringMatcher(["world", "lo w"]), ["hel", "lo world"]) == ("hel", "lo w")
    assert _feed(StopStringMatcher(["ab", "abc"], True), ["xab", "c"]) == ("xab", "ab")
    assert _feed(StopStringMatcher(["\n\n"]), ["a\n", "\nb"]) == ("a", "\n\n")
    assert _feed(StopStringMatcher([]), ["any", " text"]) == ("any text", None)
    assert _feed(StopStringMatcher([""]), ["empty stops are ignored"]) == ("empty stops are ignored", None)


@pytest.mark.parametrize("include", [False, True])
def test_streaming_equals_one_shot(include: bool) -> None:
    rng = random.Random(2)
    for _ in range(500):
        full = "".join(rng.choice("abc\n") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc\n") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        hits = [(full.find(s), -len(s), s) for s in stops if s in full]
        if hits:
            at, _, stop = min(hits)
            expected = (full[:at + (len(stop) if include else 0)], stop)
        else:
            expected = (full, None)
        cuts = sorted(rng.sample(range(len(full) + 1), k=min(len(full) + 1, rng.randint(0, 6))))
        pieces = [full[a:b] for a, b in zip([0] + cuts, cuts + [len(full)])]
        assert _feed(StopStringMatcher(stops, include), pieces) == expected, (full, stops, pieces)
