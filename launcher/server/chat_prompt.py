"""Chat messages -> prompt token ids through the model's (or the profile's) chat template."""
from __future__ import annotations

from engine.chat_template import ChatTemplateError
from launcher.server.errors import bad_request
from launcher.server.protocol_chat import ChatRequest
from launcher.server.served_model import ServedModel
from launcher.server.tool_parsers import detect_tool_parser
from launcher.server.tool_prompt import template_renders_tools, with_tools_as_text

# Template variables a request's chat_template_kwargs may not replace.
_RESERVED_KWARGS = frozenset(("messages", "tools", "add_generation_prompt", "chat_template", "bos_token",
                              "eos_token", "documents"))


def render_chat_prompt(model: ServedModel, req: ChatRequest) -> list[int]:
    """The prompt token ids: messages (and tools) rendered by the model's or the profile's template."""
    if not model.chat_template:
        raise bad_request("this model has no chat template; set model.chat_template in the profile, or use "
                          "/v1/completions", "messages")
    reserved = _RESERVED_KWARGS & set(req.chat_template_kwargs)
    if reserved:
        raise bad_request(f"'chat_template_kwargs' may not set {', '.join(sorted(reserved))}", "chat_template_kwargs")
    messages = [_for_template(m, model.content_format) for m in req.messages]
    if req.tools and req.tool_choice != "none" and not template_renders_tools(model.chat_template) \
            and detect_tool_parser(model.chat_template) == "hermes":
        messages = with_tools_as_text(messages, req.tools)
    try:
        text = model.tokenizer.apply_chat_template(
            messages, tools=req.tools, add_generation_prompt=req.add_generation_prompt,
            chat_template=model.chat_template, **req.chat_template_kwargs)
    except (ChatTemplateError, TypeError, ValueError) as e:
        raise bad_request(f"the chat template could not render these messages: {e}", "messages") from None
    if req.continue_final_message:
        text = _cut_after_final(text, messages[-1].get("content") or "")
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise bad_request("the rendered prompt is empty", "messages")
    return ids


def _for_template(message: dict, content_format: str) -> dict:
    content = message.get("content")
    if content_format == "string":
        if isinstance(content, list):
            if any(part["type"] == "image" for part in content):
                raise bad_request("this model's chat template takes string contents, so it cannot place images; "
                                  "set model.chat_template_content_format = 'openai' with a template that renders "
                                  "image parts", "messages")
            content = "\n".join(part["text"] for part in content)
        elif content is None:
            content = ""   # templates concatenate strings; an assistant turn with only tool calls has none
    elif isinstance(content, str):
        content = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        # the template sees {"type": "image"} (HF's shape) and writes the model's placeholder for it
        content = [{"type": "image"} if part["type"] == "image" else part for part in content]
    return {**message, "content": content}


def _cut_after_final(text: str, final: str | list) -> str:
    """Drop what the template appends after the last message (end-of-turn), so generation continues it."""
    if isinstance(final, list):
        final = "".join(p.get("text", "") for p in final)
    at = text.rfind(final) if final else -1
    return text[:at + len(final)] if at >= 0 else text
