"""The audio endpoints' form parsing: every field's type and range, and the combinations OpenAI refuses."""
import pytest

from launcher.server.errors import APIError
from launcher.server.protocol_audio import parse_audio_request
from launcher.server.realtime import RealtimeError, parse_session_fields

MULTIPART = "multipart/form-data; boundary=abc"
WAV = b"RIFF....WAVEfmt "


def parse(fields: dict | None = None, task: str = "transcribe", files: dict | None = None,
          content_type: str = MULTIPART):
    fields = {k: (v if isinstance(v, list) else [v]) for k, v in (fields or {}).items()}
    return parse_audio_request(task, content_type, fields, {"file": [WAV]} if files is None else files)


def refused(fields: dict | None = None, **kw) -> dict:
    with pytest.raises(APIError) as e:
        parse(fields, **kw)
    assert e.value.status == 400
    return e.value.body()["error"]


def test_defaults_are_openai_s():
    req = parse({"model": "whisper"})
    assert (req.task, req.audio, req.model, req.language, req.prompt) == ("transcribe", WAV, "whisper", None, "")
    assert (req.response_format, req.temperature, req.stream, req.include_usage, req.seed) == \
        ("json", 0.0, False, False, None)
    assert req.timestamps is False
    assert parse().model is None   # the server's first speech model


def test_every_field_is_read_as_its_type():
    req = parse({"model": "w", "language": " de ", "prompt": "Hallo.", "response_format": "verbose_json",
                 "timestamp_granularities[]": ["segment", "segment"], "temperature": "0.4", "seed": "-7"})
    assert (req.language, req.prompt, req.response_format) == ("de", "Hallo.", "verbose_json")
    assert req.timestamp_granularities == ("segment",) and req.timestamps
    assert req.temperature == 0.4 and req.seed == -7
    streamed = parse({"stream": "true", "stream_include_usage": "True", "stream_continuous_usage_stats": "1"})
    assert streamed.stream and streamed.include_usage and streamed.continuous_usage_stats


@pytest.mark.parametrize("fmt, timestamps", [("json", False), ("text", False), ("srt", True), ("vtt", True),
                                             ("verbose_json", True)])
def test_timestamps_are_decoded_only_for_formats_that_show_them(fmt, timestamps):
    assert parse({"response_format": fmt}).timestamps is timestamps


@pytest.mark.parametrize("fields, param, words", [
    ({"temperature": "hot"}, "temperature", "'temperature' must be a number between 0 and 1, got a string ('hot')"),
    ({"temperature": "1.5"}, "temperature", "between 0 and 1, got 1.5"),
    ({"temperature": "nan"}, "temperature", "must be a number"),
    ({"seed": "1.5"}, "seed", "'seed' must be an integer"),
    ({"stream": "yes please"}, "stream", "'stream' must be a boolean"),
    ({"response_format": "xml"}, "response_format", "json, text, srt, verbose_json, vtt, got 'xml'"),
    ({"timestamp_granularities[]": "word", "response_format": "verbose_json"}, "timestamp_granularities",
     "word is not supported"),
    ({"timestamp_granularities[]": "sentence", "response_format": "verbose_json"}, "timestamp_granularities",
     "'sentence'"),
    ({"timestamp_granularities[]": "segment"}, "timestamp_granularities", "needs 'response_format' verbose_json"),
    ({"stream_include_usage": "true"}, "stream_include_usage", "only allowed when 'stream' is true"),
    ({"stream": "true", "response_format": "srt"}, "response_format", "must be json or text with 'stream'"),
])
def test_wrong_fields_are_a_400_naming_them(fields, param, words):
    error = refused(fields)
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_the_file_must_be_an_upload_with_bytes():
    assert refused(files={})["message"].startswith("'file' is required")
    assert "not a text field" in refused({"file": "hello.wav"}, files={})["message"]
    assert refused(files={"file": [b""]})["message"] == "the audio file is empty"
    error = refused(content_type="application/json")
    assert error["param"] == "file" and "multipart/form-data" in error["message"]


def test_translations_take_no_language():
    assert parse({"prompt": "x"}, task="translate").task == "translate"
    error = refused({"language": "de"}, task="translate")
    assert error["param"] == "language" and "always English" in error["message"]


def test_realtime_session_fields():
    assert parse_session_fields({"type": "session.update", "model": "w", "language": "en", "temperature": 0,
                                 "input_audio_format": "pcm16", "input_audio_sample_rate": 24000}) == \
        {"model": "w", "language": "en", "temperature": 0.0, "input_audio_format": "pcm16",
         "input_audio_sample_rate": 24000}
    assert parse_session_fields({"language": None, "prompt": None}) == {"language": None, "prompt": ""}
    for fields, param in (({"model": 3}, "model"), ({"temperature": "0"}, "temperature"),
                          ({"temperature": 2}, "temperature"), ({"input_audio_format": "g711_ulaw"},
                                                                "input_audio_format"),
                          ({"input_audio_sample_rate": 1000}, "input_audio_sample_rate"),
                          ({"input_audio_sample_rate": 16000.0}, "input_audio_sample_rate")):
        with pytest.raises(RealtimeError) as e:
            parse_session_fields(fields)
        assert e.value.param == param and e.value.code == "invalid_session"
