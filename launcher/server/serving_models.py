"""GET /v1/models[/{id}], POST /tokenize and /detokenize (vLLM's shapes), GET /version."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from urllib.parse import unquote

from launcher.server.errors import bad_request, model_not_found
from launcher.server.fields import Fields
from launcher.server.protocol_chat import ChatRequest, parse_chat_request
from launcher.server.state import ServerState


def model_card(state: ServerState, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "llm",
            "root": state.settings.model_root, "parent": None,
            "max_model_len": state.info.max_model_len if state.engine.info is not None else None}


def list_models(state: ServerState) -> dict:
    return {"object": "list", "data": [model_card(state, name) for name in state.settings.served_model_names]}


def retrieve_model(state: ServerState, model_id: str) -> dict:
    model_id = unquote(model_id)   # clients escape the '/' in ids such as org/name
    if model_id not in state.settings.served_model_names:
        raise model_not_found(model_id)
    return model_card(state, model_id)


def tokenize(state: ServerState, body: dict) -> dict:
    """{"prompt": str} or {"messages": [...]} -> {"count", "max_model_len", "tokens", "token_strs"}."""
    f = Fields(body)
    model = f.str("model")
    if model is not None:
        state.check_model(model)
    return_strs = bool(f.bool("return_token_strs", False))
    if f.has("messages"):
        from launcher.server.serving_chat import render_chat_prompt
        req: ChatRequest = parse_chat_request({**body, "model": model or ""}, state.info.vocab_size)
        ids = render_chat_prompt(state, req)
    else:
        prompt = f.str("prompt")
        if prompt is None:
            raise bad_request("'prompt' (a string) or 'messages' is required", "prompt")
        ids = state.tokenizer.encode(prompt, add_special_tokens=bool(f.bool("add_special_tokens", True)))
    strs = state.tokenizer.convert_ids_to_tokens(ids) if return_strs else None
    return {"count": len(ids), "max_model_len": state.info.max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(state: ServerState, body: dict) -> dict:
    """{"tokens": [ids]} -> {"prompt": text}."""
    f = Fields(body)
    model = f.str("model")
    if model is not None:
        state.check_model(model)
    if f.raw("tokens") is None:
        raise bad_request("'tokens' (an array of token ids) is required", "tokens")
    ids = f.int_list("tokens", 0, state.info.vocab_size - 1)
    return {"prompt": state.tokenizer.decode(ids, skip_special_tokens=False)}


def version_info() -> dict:
    try:
        return {"version": version("llm-serve")}
    except PackageNotFoundError:
        return {"version": "0+unknown"}
