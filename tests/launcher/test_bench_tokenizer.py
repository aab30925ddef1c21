"""`llm bench serve`'s prompt tokenizer: the server's own, in vLLM's or llama.cpp's shape; never a silent switch."""
import json

import pytest

from launcher.bench.client import ServerTokenizer
from launcher.bench.serve import ServeBenchConfig, _pick_tokenizer
from tests.launcher.loopback_http import JSONHandler, serve as _serve

VOCAB = ["hello", " world", " there"]


def _ids(text: str) -> list[int]:
    out, rest = [], text
    while rest:
        match = next(i for i, piece in enumerate(VOCAB) if rest.startswith(piece))
        out.append(match)
        rest = rest[len(VOCAB[match]):]
    return out


class _LlamaCppShapes(JSONHandler):
    """llama.cpp's server: POST /tokenize {"content"} -> {"tokens"}, /detokenize {"tokens"} -> {"content"};
    a body in vLLM's shape ({"prompt"}) is a 500, as llama.cpp answers a missing field."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize" and "content" in body:
            self.answer(200, {"tokens": _ids(body["content"])})
        elif self.path == "/detokenize" and "tokens" in body and "model" not in body:
            self.answer(200, {"content": "".join(VOCAB[t] for t in body["tokens"])})
        else:
            self.answer(500, {"error": {"code": 500, "message": "[json.exception.out_of_range.403] key 'content'"}})


class _NoTokenizer(_LlamaCppShapes):
    def do_POST(self):
        self.answer(404, {"error": "not found"})


@pytest.fixture
def llama_cpp():
    server, url = _serve(_LlamaCppShapes)
    yield url
    server.shutdown()


def test_llama_cpp_shapes_are_spoken(llama_cpp):
    tokenizer = ServerTokenizer(llama_cpp, "m")
    assert tokenizer.available() and tokenizer.dialect == "llama.cpp"
    assert tokenizer.encode("hello world there") == [0, 1, 2]
    assert tokenizer.decode([0, 2]) == "hello there"
    config = ServeBenchConfig(url=llama_cpp, model="m", progress=False)
    picked, kind = _pick_tokenizer(config, "m")
    assert kind == "server" and picked.dialect == "llama.cpp"


def test_words_only_with_a_warning_even_when_quiet(capsys):
    server, url = _serve(_NoTokenizer)
    try:
        config = ServeBenchConfig(url=url, model="m", progress=False)
        _, kind = _pick_tokenizer(config, "m")
        assert kind == "words"
        assert "approximated by word counts" in capsys.readouterr().err
        with pytest.raises(Exception, match="does not answer /tokenize"):
            _pick_tokenizer(ServeBenchConfig(url=url, model="m", progress=False, tokenizer="server"), "m")
    finally:
        server.shutdown()
