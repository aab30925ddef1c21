"""GET /v1/models[/{id}], POST /tokenize and /detokenize (vLLM's shapes), GET /version."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from urllib.parse import unquote

from launcher.server.chat_prompt import render_chat_prompt
from launcher.server.errors import bad_request
from launcher.server.fields import Fields
from launcher.server.protocol_chat import parse_chat_request
from launcher.server.served_model import ServedModel
from launcher.server.state import ServerState


def model_card(model: ServedModel, name: str) -> dict:
    return {"id": name, "object": "model", "created": model.created, "owned_by": "llm",
            "root": model.settings.model_root, "parent": None,
            "max_model_len": model.info.max_model_len if model.client.info is not None else None}


def list_models(state: ServerState) -> dict:
    registry = state.registry
    return {"object": "list", "data": [model_card(registry.get(name), name) for name in registry.names]}


def retrieve_model(state: ServerState, model_id: str) -> dict:
    model_id = unquote(model_id)   # clients escape the '/' in ids such as org/name
    return model_card(state.registry.get(model_id), model_id)


def _model_for(state: ServerState, f: Fields) -> ServedModel:
    """The model a tokenizer request names, or the first one when it names none (vLLM's shape has it optional)."""
    name = f.str("model")
    return state.registry.ready(name) if name is not None else state.registry.primary


def tokenize(state: ServerState, body: dict) -> dict:
    """{"prompt": str} or {"messages": [...]} -> {"count", "max_model_len", "tokens", "token_strs"}."""
    f = Fields(body)
    model = _model_for(state, f)
    return_strs = bool(f.bool("return_token_strs", False))
    if f.has("messages"):
        req = parse_chat_request({**body, "model": body.get("model") or ""}, model.info.vocab_size)
        ids = render_chat_prompt(model, req)
    else:
        prompt = f.str("prompt")
        if prompt is None:
            raise bad_request("'prompt' (a string) or 'messages' is required", "prompt")
        ids = model.tokenizer.encode(prompt, add_special_tokens=bool(f.bool("add_special_tokens", True)))
    strs = model.tokenizer.convert_ids_to_tokens(ids) if return_strs else None
    return {"count": len(ids), "max_model_len": model.info.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(state: ServerState, body: dict) -> dict:
    """{"tokens": [ids]} -> {"prompt": text}."""
    f = Fields(body)
    model = _model_for(state, f)
    if f.raw("tokens") is None:
        raise bad_request("'tokens' (an array of token ids) is required", "tokens")
    ids = f.int_list("tokens", 0, model.info.vocab_size - 1)
    return {"prompt": model.tokenizer.decode(ids, skip_special_tokens=False)}


def version_info() -> dict:
    try:
        return {"version": version("llm-serve")}
    except PackageNotFoundError:
        return {"version": "0+unknown"}
