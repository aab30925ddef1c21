"""POST /pooling, /classify, /score, /rerank (and /v1/rerank, Jina's shape), /v2/rerank (Cohere's): a pooling
model's outputs, all of one request's inputs in one engine call. Score and rerank run a cross-encoder over each
pair (its activated logit) or, for an embedding model, take the cosine similarity of the two embeddings."""
from __future__ import annotations

import base64
import math
import time

from sanic import HTTPResponse
from sanic.request import Request

from engine.messages import EmbedOutput
from engine.protocol import EngineDeadError
from engine.validation import InvalidRequest, check_inputs
from launcher.server.errors import APIError, bad_request
from launcher.server.protocol_pooling import RerankRequest, parse_inputs, parse_rerank, parse_score
from launcher.server.responses import json_response
from launcher.server.served_model import ServedModel
from launcher.server.state import ServerState

COHERE_DOCS_PER_SEARCH_UNIT = 100   # Cohere bills one search unit per query with up to 100 documents


def require(state: ServerState, model: ServedModel, capability: str, endpoint: str) -> None:
    """A 400 unless the model serves `capability`, naming the local models that do."""
    registry = state.registry
    model.check_serves(capability, endpoint, [n for n in registry.names if capability in registry.get(n).capabilities])


def _limit(model: ServedModel, truncate: int | None) -> int | None:
    limit = model.info.max_model_len
    if truncate is None:
        return None
    if truncate > limit:
        raise bad_request(f"'truncate_prompt_tokens' ({truncate}) is more than this model's maximum of {limit} "
                          "tokens", "truncate_prompt_tokens")
    return limit if truncate == -1 else truncate


def _checked(model: ServedModel, ids: list[list[int]], param: str) -> list[list[int]]:
    try:
        check_inputs(ids, model.info.vocab_size, model.info.max_model_len, param)
    except InvalidRequest as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None
    return ids


def encode_inputs(model: ServedModel, inputs: list, max_len: int | None, param: str = "input") -> list[list[int]]:
    """Texts through the tokenizer (truncated from the end, special tokens kept, as transformers does); token
    id lists as given (truncated to their last max_len ids, as vLLM does)."""
    ids = [model.tokenizer.encode_pair(x, None, max_len)[0] if isinstance(x, str)
           else list(x if max_len is None else x[-max_len:]) for x in inputs]
    return _checked(model, ids, param)


async def _pool(state: ServerState, model: ServedModel, prefix: str, ids: list[list[int]], task: str,
                token_type_ids: list[list[int]] | None = None) -> EmbedOutput:
    with state.admitted():
        try:
            out = await model.client.embed(state.new_request_id(prefix), ids, task=task, token_type_ids=token_type_ids)
        except EngineDeadError as e:
            raise APIError(503, f"the engine is not available: {e}", "service_unavailable_error") from None
    if out.error_code == "not_supported":   # a task this model cannot run (the engine says which)
        raise bad_request(out.error, "task", out.error_code)
    if out.error:
        raise APIError(500, f"{task} failed: {out.error}", "server_error", code=out.error_code)
    return out


async def score_pairs(state: ServerState, model: ServedModel, pairs: list[tuple[str, str]],
                      truncate: int | None) -> tuple[list[float], int]:
    """(one score per pair, prompt tokens run), in one engine call."""
    import numpy as np   # imported where used: most servers never pool
    max_len = _limit(model, truncate)
    if model.info.labels:   # a cross-encoder: both texts in one input, the label's activated logit
        encoded = [model.tokenizer.encode_pair(a, b, max_len) for a, b in pairs]
        ids = _checked(model, [e[0] for e in encoded], "text_2")
        out = await _pool(state, model, "score", ids, "classify", [e[1] for e in encoded])
        return [float(p[0]) for p in out.probs], out.num_tokens
    texts = list(dict.fromkeys(t for pair in pairs for t in pair))   # each distinct text embedded once
    out = await _pool(state, model, "score", encode_inputs(model, texts, max_len, "text_2"), "embed")
    vectors = np.asarray(out.embeddings, dtype=np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    row = {t: i for i, t in enumerate(texts)}
    return [float(vectors[row[a]] @ vectors[row[b]]) for a, b in pairs], out.num_tokens


def _usage(num_tokens: int) -> dict:
    return {"prompt_tokens": num_tokens, "total_tokens": num_tokens, "completion_tokens": 0}


def _envelope(state: ServerState, prefix: str, name: str, data: list, num_tokens: int) -> HTTPResponse:
    return json_response({"id": state.new_request_id(prefix), "object": "list", "created": int(time.time()),
                          "model": name, "data": data, "usage": _usage(num_tokens)})


async def create_pooling(state: ServerState, model: ServedModel, request: Request, body: dict) -> HTTPResponse:
    """vLLM's /pooling: the model's pooled output per input (embedding, or a classifier's probabilities), or
    with task 'token_embed' every token's last hidden state."""
    import numpy as np   # imported where used: most servers never pool
    require(state, model, "pooling", "/pooling")
    req = parse_inputs(body, model.info.vocab_size, pooling=True)
    labels = model.info.labels
    task = req.task or ("classify" if labels else "embed")
    if (task == "classify") != bool(labels) and task != "token_embed":
        raise bad_request(f"task {task!r} does not fit the model `{model.names[0]}` (it is "
                          f"{'a classifier' if labels else 'an embedding model'})", "task")
    out = await _pool(state, model, "pool", encode_inputs(model, req.inputs, _limit(model, req.truncate_prompt_tokens)),
                      task)
    rows = {"embed": out.embeddings, "classify": out.probs, "token_embed": out.token_embeddings}[task]
    data = [{"index": i, "object": "pooling",
             "data": base64.b64encode(np.ascontiguousarray(row, dtype=np.float32).tobytes()).decode()
             if req.encoding_format == "base64" else np.asarray(row).tolist()}
            for i, row in enumerate(rows)]
    return _envelope(state, "pool", body["model"], data, out.num_tokens)


async def create_classify(state: ServerState, model: ServedModel, request: Request, body: dict) -> HTTPResponse:
    """vLLM's /classify: per input the most likely label, every label's probability and their number."""
    import numpy as np   # imported where used: most servers never pool
    require(state, model, "classify", "/classify")
    req = parse_inputs(body, model.info.vocab_size, pooling=False)
    ids = encode_inputs(model, req.inputs, _limit(model, req.truncate_prompt_tokens))
    out = await _pool(state, model, "classify", ids, "classify")
    labels = model.info.labels
    data = [{"index": i, "label": labels[int(np.argmax(p))], "probs": [float(x) for x in p], "num_classes": len(labels)}
            for i, p in enumerate(out.probs)]
    return _envelope(state, "classify", body["model"], data, out.num_tokens)


async def create_score(state: ServerState, model: ServedModel, request: Request, body: dict) -> HTTPResponse:
    """vLLM's /score: one score per (text_1, text_2) pair."""
    require(state, model, "score", "/score")
    req = parse_score(body)
    scores, num_tokens = await score_pairs(state, model, req.pairs, req.truncate_prompt_tokens)
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return _envelope(state, "score", body["model"], data, num_tokens)


async def _ranked(state: ServerState, model: ServedModel, req: RerankRequest) -> tuple[list[dict], int]:
    scores, num_tokens = await score_pairs(state, model, [(req.query, d) for d in req.documents],
                                           req.truncate_prompt_tokens)
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[: req.top_n]
    return [{"index": i, "relevance_score": scores[i],
             **({"document": {"text": req.documents[i]}} if req.return_documents else {})} for i in order], num_tokens


async def create_rerank(state: ServerState, model: ServedModel, request: Request, body: dict) -> HTTPResponse:
    """/rerank and /v1/rerank (Jina's and vLLM's shape): results most relevant first."""
    require(state, model, "rerank", "/rerank")
    results, num_tokens = await _ranked(state, model, parse_rerank(body, cohere=False))
    return json_response({"id": state.new_request_id("rerank"), "model": body["model"],
                          "usage": {"total_tokens": num_tokens}, "results": results})


async def create_rerank_v2(state: ServerState, model: ServedModel, request: Request, body: dict) -> HTTPResponse:
    """/v2/rerank (Cohere's shape): results most relevant first; documents only with return_documents."""
    require(state, model, "rerank", "/v2/rerank")
    req = parse_rerank(body, cohere=True)
    results, _ = await _ranked(state, model, req)
    units = math.ceil(len(req.documents) / COHERE_DOCS_PER_SEARCH_UNIT)
    return json_response({"id": state.new_request_id("rerank"), "results": results,
                          "meta": {"api_version": {"version": "2", "is_experimental": False},
                                   "billed_units": {"search_units": units}}})
