"""Request parsing for the pooling endpoints (vLLM's /pooling, /classify, /score; Jina's /rerank and /v1/rerank;
Cohere's /v2/rerank): bodies -> typed requests, every wrong field a 400 naming it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.server.errors import bad_request
from launcher.server.fields import Fields
from launcher.server.protocol import read_prompts

MAX_DOCUMENTS = 1000        # Cohere's recommended maximum per rerank request
POOLING_TASKS = ("embed", "classify", "token_embed")


@dataclass(frozen=True, slots=True)
class InputsRequest:
    """/pooling and /classify: inputs (texts or token id lists) through the model."""
    inputs: list[str | list[int]]
    truncate_prompt_tokens: int | None      # keep at most this many tokens per input (-1: the model's maximum)
    task: str | None = None                 # /pooling: one of POOLING_TASKS (None: the model's own)
    encoding_format: str = "float"          # 'float' | 'base64'


@dataclass(frozen=True, slots=True)
class ScoreRequest:
    """/score: text pairs, either one text against many or two lists zipped."""
    pairs: list[tuple[str, str]]
    truncate_prompt_tokens: int | None


@dataclass(frozen=True, slots=True)
class RerankRequest:
    """/rerank (Jina's and vLLM's shape) and /v2/rerank (Cohere's)."""
    query: str
    documents: list[str]
    top_n: int | None                       # None: every document
    return_documents: bool
    truncate_prompt_tokens: int | None


def _truncate(f: Fields) -> int | None:
    value = f.int("truncate_prompt_tokens", lo=-1)
    if value == 0:
        raise bad_request("'truncate_prompt_tokens' must be -1 (the model's maximum) or >= 1, got 0",
                          "truncate_prompt_tokens")
    return value


def parse_inputs(body: dict, vocab_size: int, pooling: bool) -> InputsRequest:
    f = Fields(body)
    f.str("model")
    f.str("user")
    inputs = read_prompts(f.raw("input"), vocab_size, param="input")
    task = f.str("task", None, choices=POOLING_TASKS) if pooling else None
    encoding = f.str("encoding_format", "float", choices=("float", "base64")) if pooling else "float"
    return InputsRequest(inputs, _truncate(f), task, encoding)


def _texts(f: Fields, key: str) -> list[str] | None:
    value = f.raw(key)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        f.fail(key, "a string or an array of strings", value)
    if not value:
        raise bad_request(f"'{key}' must not be empty", key)
    if len(value) > MAX_DOCUMENTS:
        raise bad_request(f"'{key}' may hold at most {MAX_DOCUMENTS} texts", key)
    return list(value)


def parse_score(body: dict) -> ScoreRequest:
    """text_1 / text_2 (or vLLM's newer queries / documents): one to one, one to many, or zipped lists."""
    f = Fields(body)
    f.str("model")
    names = ("queries", "documents") if f.has("queries") or f.has("documents") else ("text_1", "text_2")
    first, second = _texts(f, names[0]), _texts(f, names[1])
    for key, value in zip(names, (first, second)):
        if value is None:
            raise bad_request(f"'{key}' is required", key)
    if len(first) == 1:
        first = first * len(second)
    elif len(first) != len(second):
        raise bad_request(f"'{names[0]}' has {len(first)} texts and '{names[1]}' {len(second)}: give one "
                          f"'{names[0]}' text, or lists of the same length", names[1])
    return ScoreRequest(list(zip(first, second)), _truncate(f))


def _document(f: Fields, i: int, doc: Any) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return doc["text"]
    raise bad_request(f"'documents[{i}]' must be a string or an object with a string 'text'", "documents")


def parse_rerank(body: dict, cohere: bool) -> RerankRequest:
    """documents: strings or {"text": ...} objects. top_n: 0 or absent means all (vLLM); Cohere's starts at 1.
    return_documents: Jina's default is true, Cohere's false."""
    f = Fields(body)
    f.str("model")
    query = f.str("query")
    if query is None:
        raise bad_request("'query' (a string) is required", "query")
    docs = f.list("documents")
    if not docs:
        raise bad_request("'documents' must be a non-empty array of strings or {\"text\": ...} objects", "documents")
    if len(docs) > MAX_DOCUMENTS:
        raise bad_request(f"'documents' may hold at most {MAX_DOCUMENTS} documents, got {len(docs)}", "documents")
    documents = [_document(f, i, d) for i, d in enumerate(docs)]
    top_n = f.int("top_n", lo=1 if cohere else 0)
    return_documents = bool(f.bool("return_documents", not cohere))
    return RerankRequest(query, documents, top_n or None, return_documents, _truncate(f))
