"""POST /v1/embeddings: the hook where embedding support lands; a decoder model answers a clear 400."""
from __future__ import annotations

from launcher.server.errors import APIError, bad_request
from launcher.server.fields import Fields
from launcher.server.state import ServerState


async def create_embedding(state: ServerState, body: dict) -> dict:
    f = Fields(body)
    model = f.raw("model")
    if not isinstance(model, str):
        raise bad_request("'model' (a string) is required", "model")
    state.check_model(model)
    if f.raw("input") is None:
        raise bad_request("'input' is required", "input")
    if not state.info.is_embedding_model:
        raise APIError(400, f"the model `{model}` does not support embeddings (it is a text-generation model); "
                       "serve an embedding model for /v1/embeddings", param="model", code="model_not_supported")
    raise APIError(400, "embeddings are not supported yet", param="model", code="not_supported")
