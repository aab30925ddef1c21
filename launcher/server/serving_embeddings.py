"""POST /v1/embeddings: encoder models with their own pooling; decoder models by last-token or mean pooling."""
from __future__ import annotations

import base64

from sanic import HTTPResponse
from sanic.request import Request

from engine.protocol import EngineDeadError
from engine.validation import InvalidRequest, check_inputs
from launcher.server.errors import APIError, bad_request
from launcher.server.fields import Fields
from launcher.server.protocol import read_prompts
from launcher.server.responses import json_response
from launcher.server.served_model import ServedModel
from launcher.server.serving_pooling import require
from launcher.server.state import ServerState

DECODER_POOLING = ("last", "mean")


async def create_embedding(state: ServerState, model: ServedModel, request: Request, body: dict) -> HTTPResponse:
    import numpy as np   # imported where used: most servers never pool
    f = Fields(body)
    name = f.raw("model")
    info = model.info
    if info.labels or info.is_speech_model:   # decoder LMs pool their hidden states here; classifiers and
        # speech models (whose engine serves transcriptions only) are refused
        require(state, model, "embedding", "/v1/embeddings")
    inputs = read_prompts(f.raw("input"), info.vocab_size, param="input")
    encoding = f.str("encoding_format", "float", choices=("float", "base64"))
    pooling = f.str("pooling", None, choices=DECODER_POOLING)  # our extension, decoder models only
    if pooling is not None and info.is_embedding_model:
        raise bad_request("'pooling' applies to decoder models; this model pools as its config says", "pooling")
    normalize = bool(f.bool("normalize", True))
    dimensions = f.int("dimensions", lo=1)
    f.str("user")
    token_lists = [model.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in inputs]
    try:
        check_inputs(token_lists, info.vocab_size, info.max_model_len)
    except InvalidRequest as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None
    with state.admitted():
        try:
            out = await model.client.embed(state.new_request_id("embd"), token_lists, pooling, normalize)
        except EngineDeadError as e:
            raise APIError(503, f"the engine is not available: {e}", "service_unavailable_error") from None
    if out.error:
        raise APIError(500, f"embedding failed: {out.error}", "server_error", code=out.error_code)
    vectors = np.asarray(out.embeddings, dtype=np.float32)
    if dimensions is not None and dimensions != vectors.shape[1]:
        raise bad_request(f"this model's embeddings have {vectors.shape[1]} dimensions and cannot be shortened "
                          f"to {dimensions}", "dimensions")
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(row.tobytes()).decode() if encoding == "base64" else row.tolist()}
            for i, row in enumerate(vectors)]
    return json_response({"object": "list", "data": data, "model": name,
                          "usage": {"prompt_tokens": out.num_tokens, "total_tokens": out.num_tokens}})
