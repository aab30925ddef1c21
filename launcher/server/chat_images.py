"""The images of a chat request: checked against the model, fetched and decoded (launcher/server/images.py),
preprocessed for the model off the event loop, and placed in the rendered prompt."""
from __future__ import annotations

import asyncio

from engine.multimodal import ImageInput, ProcessedImage, expand_image_tokens
from launcher.server.errors import APIError, bad_request
from launcher.server.images import load_image
from launcher.server.served_model import ServedModel
from launcher.server.state import ServerState


def image_refs(messages: list[dict], param: str | None = None) -> list[tuple[str, str]]:
    """(url, where) of every image part, in prompt order; where is `param` when given (the Responses API's
    messages are not the request's)."""
    return [(part["url"], param or f"messages[{i}].content[{j}]")
            for i, m in enumerate(messages) if isinstance(m.get("content"), list)
            for j, part in enumerate(m["content"]) if part["type"] == "image"]


async def chat_images(state: ServerState, model: ServedModel, messages: list[dict],
                      param: str | None = None) -> list[ProcessedImage]:
    """The request's images preprocessed for the model; a model that takes none, too many images, or an
    image that cannot be had is a 400 before anything reaches the engine."""
    refs = image_refs(messages, param)
    if not refs:
        return []
    if not model.info.is_vision_model:
        registry = state.registry
        vision = [n for n in registry.names if "vision" in registry.get(n).capabilities]
        others = f"models here that do: {', '.join(vision)}" if vision else "no model on this server does"
        raise APIError(400, f"the model `{model.names[0]}` does not take images; {others}", param=refs[0][1],
                       code="model_not_supported")
    limit = model.info.limit_images_per_prompt
    if len(refs) > limit:
        raise bad_request(f"{len(refs)} images in one prompt; the model `{model.names[0]}` takes at most {limit} "
                          "(engine.limit_images_per_prompt)", param or "messages", code="too_many_images")
    media = state.settings.media
    images = await asyncio.gather(*(load_image(url, media, where) for url, where in refs))
    processor = model.image_processor
    # resizing a photo takes tens of milliseconds: not on the event loop
    return await asyncio.to_thread(lambda: [processor.preprocess(image) for image in images])


def place_images(model: ServedModel, token_ids: list[int], images: list[ProcessedImage],
                 ) -> tuple[list[int], tuple[ImageInput, ...]]:
    """Expand each image's placeholder in the rendered prompt to its embeddings' count."""
    if not images:
        return token_ids, ()
    try:
        ids, placed = expand_image_tokens(token_ids, images, model.image_processor.image_token_id)
    except ValueError as e:
        raise bad_request(f"{e}: the chat template must write one image placeholder per image part, and the text "
                          "may not hold the placeholder itself", "messages") from None
    return ids, tuple(placed)
