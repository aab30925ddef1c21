"""What the engine accepts, checked by its clients before they send (the server, the offline LLM) — and,
for embeddings, by the embedding models themselves (they are a library API too).

The engine core only asserts these: a request that fails them is a client's bug, not an engine error.
"""
from __future__ import annotations

from collections.abc import Sequence

from engine.messages import EngineInfo
from engine.multimodal import ImageInput


class InvalidRequest(ValueError):
    """A request the engine cannot run; `param` and `code` are for an OpenAI-shaped error."""

    def __init__(self, message: str, param: str | None = "prompt", code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def check_context_length(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                         param: str = "prompt") -> None:
    """The prompt and max_tokens (None: at least one token) must fit max_model_len: never truncated."""
    if num_prompt_tokens + (max_tokens or 1) <= max_model_len:
        return
    asked = "" if max_tokens is None else (f" and {max_tokens} requested for the completion "
                                          f"({num_prompt_tokens + max_tokens} in total)")
    raise InvalidRequest(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                         f"{num_prompt_tokens} tokens in the prompt{asked}. Please reduce the length of the prompt "
                         "or max_tokens.", param, "context_length_exceeded")


def check_request(prompt_token_ids: Sequence[int], max_tokens: int | None, info: EngineInfo,
                  param: str = "prompt", images: Sequence[ImageInput] = ()) -> None:
    """A generation request for this engine: a non-empty prompt of known ids that fits the context, and
    images only for a vision model, no more than it allows, each over its own span of the prompt."""
    if info.is_embedding_model:
        raise InvalidRequest(f"the model `{info.model_name}` is an embedding model: it does not generate text",
                             "model", "model_not_supported")
    if not prompt_token_ids:
        raise InvalidRequest("the prompt is empty (it encodes to no tokens)", param)
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= info.vocab_size:
        raise InvalidRequest(f"prompt token ids must be in [0, {info.vocab_size})", param)
    check_context_length(len(prompt_token_ids), max_tokens, info.max_model_len, param)
    if images:
        check_images(images, len(prompt_token_ids), info, param)


def check_images(images: Sequence[ImageInput], num_prompt_tokens: int, info: EngineInfo, param: str) -> None:
    if not info.is_vision_model:
        raise InvalidRequest(f"the model `{info.model_name}` does not take images", param, "model_not_supported")
    if len(images) > info.limit_images_per_prompt:
        raise InvalidRequest(f"{len(images)} images in one prompt; this model takes at most "
                             f"{info.limit_images_per_prompt} (engine.limit_images_per_prompt)", param, "too_many_images")
    end = 0
    for image in images:
        if image.offset < end or image.num_tokens <= 0 or image.end > num_prompt_tokens:
            raise InvalidRequest("image placeholders must be disjoint spans of the prompt, in order", param)
        end = image.end


class InputTooLongError(InvalidRequest):
    """An embedding input has more tokens than the model takes."""

    def __init__(self, index: int, num_tokens: int, max_tokens: int, param: str = "input"):
        super().__init__(f"input {index} has {num_tokens} tokens, more than this model's maximum of "
                         f"{max_tokens} tokens", param, "context_length_exceeded")
        self.index, self.num_tokens, self.max_tokens = index, num_tokens, max_tokens


def check_inputs(token_id_lists: Sequence[Sequence[int]], vocab_size: int, max_tokens: int,
                 param: str = "input") -> None:
    """Embedding inputs: each non-empty, within the context and the vocabulary (bad ids crash CUDA gathers)."""
    for i, ids in enumerate(token_id_lists):
        if len(ids) == 0:
            raise InvalidRequest(f"input {i} is empty", param)
        if len(ids) > max_tokens:
            raise InputTooLongError(i, len(ids), max_tokens, param)
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise InvalidRequest(f"input {i}: token ids must be in [0, {vocab_size})", param)
