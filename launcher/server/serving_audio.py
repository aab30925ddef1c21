"""POST /v1/audio/transcriptions and /v1/audio/translations: a clip in, its text out in OpenAI's formats (json,
text, srt, vtt, verbose_json) or streamed as vLLM's transcription chunks."""
from __future__ import annotations

from collections.abc import AsyncIterator

from sanic import HTTPResponse
from sanic.request import Request

from launcher.server.errors import APIError, bad_request
from launcher.server.protocol_audio import AudioRequest, parse_audio_request
from launcher.server.responses import json_response
from launcher.server.served_model import ServedModel
from launcher.server.sse import stream_events
from launcher.server.state import ServerState
from launcher.server.transcript_formats import (CONTENT_TYPES, duration_usage, full_text, segment_json, srt,
                                                verbose_json, vtt)
from launcher.server.transcription import (Transcription, check_language, decode_upload, new_request,
                                           prompt_token_ids)
from launcher.server.upstream import UpstreamRoute

# task -> (the capability a model needs, the endpoint, the request id prefix and stream chunk object, as vLLM's)
TASKS = {"transcribe": ("transcription", "/v1/audio/transcriptions", "trsc", "transcription.chunk"),
         "translate": ("translation", "/v1/audio/translations", "trsl", "translation.chunk")}


async def create_transcription(state: ServerState, request: Request, task: str) -> HTTPResponse | None:
    """Either endpoint (`task` 'transcribe' or 'translate'); the model is held (loaded, if on demand) while the
    clip runs."""
    form, files = request.form or {}, request.files or {}
    # NOTE: getlist: Sanic's RequestParameters.get gives a field's first value, its items every value
    req = parse_audio_request(task, request.content_type, {k: form.getlist(k) for k in form},
                              {k: [f.body for f in files.getlist(k)] for k in files})
    model = await find_speech_model(state, req.model, task, request.headers.get("authorization"))
    require_speech(state, model, task)   # before `using`: an on_demand model that cannot serve it is not loaded
    async with state.registry.using(model):
        language = check_language(model, req.language)
        prompt_ids = prompt_token_ids(model, req.prompt)
        with state.admitted():
            audio = await decode_upload(req.audio, state.settings.max_audio_s)
            prefix = TASKS[task][2]
            engine_request = new_request(state.new_request_id(prefix), audio, task=task, language=language,
                                         prompt_ids=prompt_ids, temperature=req.temperature,
                                         timestamps=req.timestamps, seed=req.seed)
            run = Transcription(model, engine_request, state.settings.request_timeout_s)
            if req.stream:
                await stream_events(request, _chunks(req, run, req.model or model.names[0]))
                return None
            await run.run()
            return _answer(req, run)


async def find_speech_model(state: ServerState, name: str | None, task: str,
                            authorization: str | None = None) -> ServedModel:
    """The local model `name` (404 if none), or without a name the server's first model that serves the task."""
    registry = state.registry
    if name is None:
        capability = TASKS[task][0]
        model = next((registry.get(n) for n in registry.names if capability in registry.get(n).capabilities), None)
        if model is None:
            raise bad_request(f"'model' is required: no model on this server serves {TASKS[task][1]}", "model")
        return model
    target = await registry.route(name, authorization, bool(state.settings.api_keys))
    if isinstance(target, UpstreamRoute):   # the upstream relay forwards JSON bodies, not multipart uploads
        raise APIError(400, f"`{name}` is a model of upstream {target.upstream.name!r}; {TASKS[task][1]} serves this "
                       "server's local models only", param="model", code="model_not_supported")
    return target


def require_speech(state: ServerState, model: ServedModel, task: str) -> None:
    """A 400 unless the model serves the task, naming the models here that do."""
    capability, endpoint = TASKS[task][:2]
    registry = state.registry
    model.check_serves(capability, endpoint, [n for n in registry.names if capability in registry.get(n).capabilities])


def _answer(req: AudioRequest, run: Transcription) -> HTTPResponse:
    texts = run.segment_texts()
    fmt = req.response_format
    if fmt == "json":
        body = {"text": full_text(texts)}
        if req.task == "transcribe":   # OpenAI's and vLLM's translation objects carry no usage
            body["usage"] = duration_usage(run.duration)
        return json_response(body)
    if fmt == "text":
        return HTTPResponse(full_text(texts), content_type=CONTENT_TYPES[fmt])
    segments = [segment_json(s, t) for s, t in zip(run.segments, texts)]
    if fmt == "verbose_json":
        return json_response(verbose_json(req.task, run.language, run.duration, segments))
    return HTTPResponse(srt(segments) if fmt == "srt" else vtt(segments), content_type=CONTENT_TYPES[fmt])


async def _chunks(req: AudioRequest, run: Transcription, model_name: str) -> AsyncIterator[dict]:
    """vLLM's stream: a chunk per text delta as it comes, a last one with finish_reason; with stream_include_usage
    a chunk of token usage (no choices) after it (stream_continuous_usage_stats: usage on every chunk too)."""
    request_id, obj = run.request.request_id, TASKS[req.task][3]

    def chunk(content: str, finish_reason: str | None) -> dict:
        out = {"id": request_id, "object": obj, "created": run.created, "model": model_name,
               "choices": [{"delta": {"content": content}, "finish_reason": finish_reason, "stop_reason": None}]}
        if req.continuous_usage_stats:
            out["usage"] = run.usage()
        return out

    async for text in run.stream():
        yield chunk(text, None)
    yield chunk("", run.finish_reason or "stop")
    if req.include_usage:
        yield {"id": request_id, "object": obj, "created": run.created, "model": model_name, "choices": [],
               "usage": run.usage()}
