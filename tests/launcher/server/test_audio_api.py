"""Speech to text end to end: a real server (supervisor -> server -> engine processes) serving the real Whisper
tiny.en and the default chat model (Whisper base, multilingual, loads on demand for translations); the official
openai client for /v1/audio/*, raw HTTP where the exact bytes matter, and the `websockets` client for /v1/realtime.
The clips are spoken by espeak-ng (tests/speech_clips.py), so the audio is real speech, if robotic."""
from __future__ import annotations

import base64
import json
import math
import re
import threading
import time
import wave
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.launcher.server.conftest import API_KEY, start_server
from tests.speech_clips import SENTENCES, speak

CHAT = "smol"
WHISPER = "whisper-tiny.en"
WHISPER_ALIAS = "whisper"
WHISPER_BASE = "whisper-base"
MAX_AUDIO_S = 10
HEARD = {"quick", "brown", "fox"}   # words of SENTENCES[0] tiny.en hears in espeak's voice


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """speech: one sentence (~4 s, espeak's own 22.05 kHz WAV); medium: two (~8.5 s); long: three, over
    MAX_AUDIO_S. The longer ones as 8 kHz WAV, to stay under the test server's 256 KiB body limit; noise: not
    audio."""
    folder = tmp_path_factory.mktemp("clips")
    out = {"speech": speak(SENTENCES[0], folder / "speech.wav"), "noise": folder / "noise.wav",
           "medium": _at_8k(speak(" ".join(SENTENCES[:2]), folder / "medium-22k.wav"), folder / "medium.wav"),
           "long": _at_8k(speak(" ".join(SENTENCES[:3]), folder / "long-22k.wav"), folder / "long.wav")}
    assert clip_seconds(out["medium"]) < MAX_AUDIO_S < clip_seconds(out["long"])
    assert out["long"].stat().st_size < 240 * 1024
    out["noise"].write_bytes(b"this is not audio at all " * 40)
    return out


def _at_8k(spoken: Path, path: Path) -> Path:
    with wave.open(str(spoken)) as w:
        rate, samples = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32)
    at_8k = np.interp(np.arange(0, len(samples), rate / 8000), np.arange(len(samples)), samples).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(at_8k.tobytes())
    return path


def clip_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


@pytest.fixture(scope="module")
def speech_server(default_gguf_path, whisper_tiny_en_path, whisper_base_path, tmp_path_factory):
    srv = start_server(f"""
[model]
source = "{default_gguf_path}"
served_names = ["{CHAT}"]
max_model_len = 2048

[engine]
device = "cpu"
kv_cache_gib = 0.25

[[models]]
source = "{whisper_tiny_en_path}"
served_names = ["{WHISPER}", "{WHISPER_ALIAS}"]

[[models]]
source = "{whisper_base_path}"
served_names = ["{WHISPER_BASE}"]
load = "on_demand"
""", tmp_path_factory.mktemp("speech"), server_extra=f"max_audio_s = {MAX_AUDIO_S}")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(speech_server):
    with openai.OpenAI(base_url=speech_server.base_url, api_key=API_KEY, max_retries=0, timeout=300) as c:
        yield c


def transcribe(client, path: Path, **kw):
    with open(path, "rb") as f:
        return client.audio.transcriptions.create(model=kw.pop("model", WHISPER), file=f, **kw)


def post(srv, path: Path | bytes, endpoint: str = "transcriptions", key: str | None = API_KEY, **fields):
    """Raw multipart POST (the exact status, headers and body)."""
    data = path.read_bytes() if isinstance(path, Path) else path
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{srv.base_url}/audio/{endpoint}", files={"file": ("clip.wav", data, "audio/wav")},
                      data=fields, headers=headers, timeout=300)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def assert_chat_still_answers(client):
    r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert r.choices[0].message.content is not None


@pytest.fixture(scope="module")
def reference(client, clips) -> str:
    """The json text of the speech clip (greedy decoding: text and the stream must agree with it)."""
    return transcribe(client, clips["speech"]).text


@pytest.fixture(scope="module")
def verbose(client, clips):
    """verbose_json of the speech clip: decoded with timestamp tokens, as srt and vtt are (Whisper may word a
    timestamped decoding differently), so theirs is the text those must agree with."""
    return transcribe(client, clips["speech"], response_format="verbose_json", timestamp_granularities=["segment"])


# ---------------------------------------------------------------------------------------------------- HTTP


def test_models_list_speech_capabilities(speech_server):
    listing = httpx.get(speech_server.base_url + "/models", headers=speech_server.auth).json()
    cards = {m["id"]: m for m in listing["data"]}
    assert cards[WHISPER]["capabilities"] == cards[WHISPER_ALIAS]["capabilities"] == ["transcription"]
    assert cards[WHISPER_BASE]["capabilities"] == ["transcription", "translation"]   # read from its files, unloaded
    assert cards[WHISPER_BASE]["status"] in ("unloaded", "loaded")
    assert cards[CHAT]["capabilities"] == ["chat", "completion"]
    assert cards[WHISPER]["max_model_len"] == 448
    catalogue = httpx.get(speech_server.url + "/api/models?capability=transcription", headers=speech_server.auth)
    assert {m["id"] for m in catalogue.json()["models"]} == {WHISPER, WHISPER_ALIAS, WHISPER_BASE}


def test_json_is_text_and_duration_usage(client, clips, reference):
    got = transcribe(client, clips["speech"], response_format="json")
    assert got.text == reference and got.text == got.text.strip()
    assert HEARD <= words(got.text), got.text
    assert got.usage.type == "duration" and got.usage.seconds == math.ceil(clip_seconds(clips["speech"]))
    assert transcribe(client, clips["speech"], model=WHISPER_ALIAS).text == reference   # an alias is the same model


def test_text_format(client, speech_server, clips, reference):
    assert transcribe(client, clips["speech"], response_format="text").strip() == reference
    raw = post(speech_server, clips["speech"], model=WHISPER, response_format="text")
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/plain") and raw.text == reference


def _cues(text: str, marker: str) -> list[tuple[float, float, str]]:
    stamp = rf"(\d\d):(\d\d):(\d\d){re.escape(marker)}(\d\d\d)"
    found = re.findall(rf"{stamp} --> {stamp}\n(.+)\n", text)
    seconds = [(int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000) for h, m, s, ms in
               [g[i:i + 4] for g in found for i in (0, 4)]]
    return [(seconds[2 * i], seconds[2 * i + 1], found[i][8]) for i in range(len(found))]


def test_srt(client, clips, verbose):
    srt = transcribe(client, clips["speech"], response_format="srt")
    cues = _cues(srt, ",")
    assert cues and srt.startswith("1\n") and srt.endswith("\n\n")
    assert [int(n) for n in re.findall(r"^(\d+)\n\d\d:", srt, re.M)] == list(range(1, len(cues) + 1))
    _check_cues(cues, verbose)


def test_vtt(client, speech_server, clips, verbose):
    vtt = transcribe(client, clips["speech"], response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    _check_cues(_cues(vtt, "."), verbose)
    raw = post(speech_server, clips["speech"], model=WHISPER, response_format="vtt")
    assert raw.headers["content-type"].startswith("text/vtt")


def _check_cues(cues, verbose):
    assert [(start, end) for start, end, _ in cues] == \
        [(pytest.approx(s.start, abs=5e-4), pytest.approx(s.end, abs=5e-4)) for s in verbose.segments]
    assert [text for *_, text in cues] == [s.text.strip() for s in verbose.segments]


def test_verbose_json(clips, verbose):
    got = verbose
    assert got.task == "transcribe" and got.language == "english"
    assert got.duration == pytest.approx(clip_seconds(clips["speech"]), abs=0.05)
    assert got.usage.seconds == math.ceil(clip_seconds(clips["speech"]))
    assert got.segments and got.text == "".join(s.text for s in got.segments).strip()
    assert HEARD <= words(got.text), got.text
    for i, s in enumerate(got.segments):
        assert s.id == i and s.start < s.end <= got.duration + 0.05 and s.seek == round(s.start * 100)
        assert s.tokens and all(t < 50256 for t in s.tokens)   # text tokens only
        assert s.temperature == 0.0 and s.avg_logprob < 0 and 0 <= s.no_speech_prob <= 1 and s.compression_ratio > 0


def test_prompt_temperature_language_and_seed_are_taken(client, clips):
    got = transcribe(client, clips["speech"], prompt="A test of a speech server.", temperature=0.5, language="en",
                     extra_body={"seed": 7})
    again = transcribe(client, clips["speech"], prompt="A test of a speech server.", temperature=0.5,
                       language="english", extra_body={"seed": 7})
    assert got.text and got.text == again.text   # the same seed samples the same text


def test_stream_sends_vllm_transcription_chunks(speech_server, clips, reference):
    body = _sse(speech_server, clips["speech"], model=WHISPER, stream="true", stream_include_usage="true")
    events, done = body[:-1], body[-1]
    assert done == "[DONE]"
    chunks = [json.loads(e) for e in events]
    *content, usage = chunks
    assert all(c["object"] == "transcription.chunk" and c["model"] == WHISPER and c["id"].startswith("trsc-")
               for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and len(content) > 2   # deltas as tokens become final
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == reference
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (len(content) - 1) + ["stop"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]


def test_stream_through_the_openai_client(client, clips, reference):
    with open(clips["speech"], "rb") as f:
        stream = client.audio.transcriptions.create(model=WHISPER, file=f, stream=True)
        text = "".join(getattr(chunk, "choices")[0]["delta"]["content"] for chunk in stream
                       if getattr(chunk, "choices", None))
    assert text == reference


def _sse(srv, path: Path, endpoint: str = "transcriptions", **fields) -> list[str]:
    with httpx.stream("POST", f"{srv.base_url}/audio/{endpoint}", headers=srv.auth, data=fields, timeout=300,
                      files={"file": ("clip.wav", path.read_bytes(), "audio/wav")}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]


def metric(srv, name: str, model: str = WHISPER, extra: str = "") -> float:
    text = httpx.get(srv.url + "/metrics").text
    return float(re.search(rf'^llm:{name}{{model_name="{re.escape(model)}"{extra}}} (\S+)$', text, re.M).group(1))


def wait_idle(srv, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(srv, "num_requests_running") or metric(srv, "num_requests_waiting") or \
            metric(srv, "kv_cache_blocks_used"):
        assert time.monotonic() < deadline, "the speech engine is still busy"
        time.sleep(0.05)


def full_run_tokens(srv, path: Path) -> float:
    """How many tokens the engine samples for the whole clip (the yardstick for an aborted run)."""
    wait_idle(srv)
    before = metric(srv, "generation_tokens_total")
    assert post(srv, path, model=WHISPER).status_code == 200
    return metric(srv, "generation_tokens_total") - before


def test_a_client_leaving_a_stream_aborts_it(speech_server, clips):
    full = full_run_tokens(speech_server, clips["medium"])
    before = metric(speech_server, "generation_tokens_total")
    aborts = metric(speech_server, "request_success_total", extra=',finished_reason="abort"')
    with httpx.stream("POST", f"{speech_server.base_url}/audio/transcriptions", headers=speech_server.auth,
                      data={"model": WHISPER, "stream": "true"}, timeout=300,
                      files={"file": ("clip.wav", clips["medium"].read_bytes(), "audio/wav")}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["content"]
    wait_idle(speech_server)
    assert metric(speech_server, "generation_tokens_total") - before < full / 2   # stopped, not run to the end
    assert metric(speech_server, "request_success_total", extra=',finished_reason="abort"') == aborts + 1


def test_a_chat_model_asked_to_transcribe_names_the_speech_models(client, clips):
    with pytest.raises(openai.BadRequestError) as e:
        transcribe(client, clips["speech"], model=CHAT)
    error = e.value.body
    assert error["code"] == "model_not_supported" and error["param"] == "model"
    assert CHAT in error["message"] and WHISPER in error["message"] and WHISPER_BASE in error["message"]


def test_a_speech_model_asked_to_chat_or_embed_says_what_it_serves(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=WHISPER, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["code"] == "model_not_supported" and "speech-to-text" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=WHISPER, input="Hi")
    assert e.value.body["code"] == "model_not_supported" and "transcription" in e.value.body["message"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # the openai client marks translations deprecated
def test_translations(speech_server, client, clips):
    with pytest.raises(openai.BadRequestError) as e:   # English-only: names the model that translates
        with open(clips["speech"], "rb") as f:
            client.audio.translations.create(model=WHISPER, file=f)
    assert WHISPER_BASE in e.value.body["message"] and "/v1/audio/translations" in e.value.body["message"]
    with open(clips["speech"], "rb") as f:
        got = client.audio.translations.create(model=WHISPER_BASE, file=f)   # loads it on demand
    assert HEARD <= words(got.text), got.text
    with open(clips["speech"], "rb") as f:
        verbose = client.audio.translations.create(model=WHISPER_BASE, file=f, response_format="verbose_json")
    assert verbose.task == "translate" and verbose.language == "english" and verbose.segments
    assert not hasattr(got, "usage") or got.usage is None   # OpenAI's translation object has none
    *chunks, done = _sse(speech_server, clips["speech"], "translations", model=WHISPER_BASE, stream="true")
    chunks = [json.loads(c) for c in chunks]
    assert done == "[DONE]" and all(c["object"] == "translation.chunk" and c["id"].startswith("trsl-") for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == got.text


@pytest.mark.parametrize("case, fields, param", [
    ("not audio", {}, "file"),
    ("empty file", {}, "file"),
    ("wrong type", {"temperature": "hot"}, "temperature"),
    ("unknown format", {"response_format": "xml"}, "response_format"),
    ("word timestamps", {"response_format": "verbose_json", "timestamp_granularities[]": "word"},
     "timestamp_granularities"),
    ("unknown language", {"language": "de"}, "language"),
    ("too long", {}, "file"),
    ("no file", {}, "file"),
])
def test_bad_inputs_are_400s_and_the_server_goes_on(speech_server, client, clips, case, fields, param):
    data = {"not audio": clips["noise"].read_bytes(), "empty file": b"", "too long": clips["long"].read_bytes()}.get(
        case, clips["speech"].read_bytes())
    if case == "no file":
        r = httpx.post(f"{speech_server.base_url}/audio/transcriptions", headers=speech_server.auth,
                       data={"model": WHISPER}, timeout=60)
    else:
        r = post(speech_server, data, model=WHISPER, **fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    if case == "too long":
        assert "server.max_audio_s" in error["message"]
    assert_chat_still_answers(client)


def test_the_api_key_is_required(speech_server, clips):
    assert post(speech_server, clips["speech"], key=None, model=WHISPER).status_code == 401
    assert post(speech_server, clips["speech"], key="wrong", model=WHISPER).status_code == 401
    with pytest.raises(InvalidStatus) as e:
        connect(speech_server.url.replace("http", "ws") + "/v1/realtime", open_timeout=30).close()
    assert e.value.response.status_code == 401


# ------------------------------------------------------------------------------------------------ realtime


def pcm16(path: Path) -> bytes:
    """The clip as the realtime API takes it: 16 kHz mono 16-bit PCM."""
    from engine.audio import decode_audio
    return (np.clip(decode_audio(path.read_bytes()), -1, 1) * 32767).astype("<i2").tobytes()


class Realtime:
    """One /v1/realtime session (the sync websockets client), as a context manager."""

    def __init__(self, srv):
        self._connect = connect(srv.url.replace("http", "ws") + "/v1/realtime", open_timeout=30,
                                additional_headers={"Authorization": f"Bearer {API_KEY}"})

    def __enter__(self) -> "Realtime":
        self.ws = self._connect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._connect.__exit__(*exc)

    def send(self, event: dict | str) -> None:
        self.ws.send(event if isinstance(event, str) else json.dumps(event))

    def recv(self, timeout: float = 300) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def append(self, pcm: bytes, chunk: int = 4096) -> None:
        for i in range(0, len(pcm), chunk):
            self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + chunk]).decode()})

    def start(self, model: str = WHISPER) -> None:
        assert self.recv()["type"] == "session.created"
        self.send({"type": "session.update", "model": model})
        assert self.recv()["type"] == "session.updated"

    def until_done(self) -> tuple[list[str], dict]:
        deltas = []
        while (event := self.recv())["type"] == "transcription.delta":
            deltas.append(event["delta"])
        assert event["type"] == "transcription.done", event
        return deltas, event


@pytest.fixture
def rt(speech_server):
    with Realtime(speech_server) as session:
        yield session


def test_realtime_transcribes_each_commit(rt, clips, reference):
    created = rt.recv()
    assert created["type"] == "session.created" and created["id"].startswith("sess-")
    rt.send({"type": "session.update", "model": WHISPER})
    updated = rt.recv()
    assert updated["type"] == "session.updated" and updated["session"]["model"] == WHISPER
    assert updated["session"]["input_audio_sample_rate"] == 16000
    pcm = pcm16(clips["speech"])
    rt.send({"type": "input_audio_buffer.commit"})   # vLLM's clients open with an empty commit: nothing happens
    rt.append(pcm)
    rt.send({"type": "input_audio_buffer.commit", "final": True})
    deltas, done = rt.until_done()
    assert deltas and done["text"] == "".join(deltas).strip()
    assert HEARD <= words(done["text"]) and words(done["text"]) & words(reference)
    assert done["usage"]["completion_tokens"] > 0
    # a second utterance at 24 kHz (OpenAI's pcm16 rate), resampled by the server
    rt.send({"type": "session.update", "session": {"input_audio_sample_rate": 24000}})
    assert rt.recv()["session"]["input_audio_sample_rate"] == 24000
    samples = np.frombuffer(pcm, "<i2").astype(np.float32)
    upsampled = np.interp(np.arange(0, len(samples), 16000 / 24000), np.arange(len(samples)), samples)
    rt.append(upsampled.astype("<i2").tobytes())
    rt.send({"type": "input_audio_buffer.commit"})
    _, again = rt.until_done()
    assert HEARD <= words(again["text"])


def test_realtime_errors_keep_the_socket_open(rt, clips):
    assert rt.recv()["type"] == "session.created"
    expected = [("this is not json", "invalid_json"), ("[1, 2]", "invalid_event"),
                ({"type": "response.create"}, "unknown_event"),
                ({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}, "invalid_audio"),
                ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"odd").decode()}, "invalid_audio"),
                ({"type": "input_audio_buffer.commit"}, "model_not_validated"),
                ({"type": "session.update", "model": CHAT}, "model_not_supported"),
                ({"type": "session.update", "model": "no-such-model"}, "model_not_found"),
                ({"type": "session.update", "temperature": "warm"}, "invalid_session")]
    for message, code in expected:
        rt.send(message)
        event = rt.recv()
        assert event["type"] == "error" and event["code"] == code and event["error"], (message, event)
    rt.ws.send(b"\x00\x01")   # a binary frame
    assert rt.recv()["code"] == "invalid_event"
    rt.send({"type": "session.update", "model": WHISPER, "language": "de"})   # tiny.en takes English only
    assert rt.recv()["code"] == "unsupported_language"
    rt.send({"type": "session.update", "model": WHISPER})
    assert rt.recv()["type"] == "session.updated"
    rt.append(b"\x00\x00" * 16000 * MAX_AUDIO_S)   # exactly the limit is taken ...
    rt.append(b"\x00\x00" * 160)                   # ... one more chunk is not
    assert rt.recv()["code"] == "audio_too_long"
    rt.send({"type": "input_audio_buffer.clear"})
    assert rt.recv()["type"] == "input_audio_buffer.cleared"
    rt.append(pcm16(clips["speech"]))
    rt.send({"type": "input_audio_buffer.commit"})
    _, done = rt.until_done()   # after all that, the session still transcribes
    assert HEARD <= words(done["text"])


def test_closing_the_socket_aborts_its_transcription(speech_server, clips):
    full = full_run_tokens(speech_server, clips["medium"])
    before = metric(speech_server, "generation_tokens_total")
    with Realtime(speech_server) as session:
        session.start()
        session.append(pcm16(clips["medium"]))
        session.send({"type": "input_audio_buffer.commit"})
        assert session.recv()["type"] == "transcription.delta"
    wait_idle(speech_server)
    assert metric(speech_server, "generation_tokens_total") - before < full / 2


def test_realtime_and_http_run_concurrently(speech_server, client, clips, reference):
    results: dict[str, str] = {}

    def over_http():
        results["http"] = transcribe(client, clips["speech"]).text

    thread = threading.Thread(target=over_http)
    with Realtime(speech_server) as session:
        session.start(WHISPER_ALIAS)
        thread.start()
        session.append(pcm16(clips["speech"]))
        session.send({"type": "input_audio_buffer.commit"})
        _, done = session.until_done()
    thread.join(300)
    assert results["http"] == reference and HEARD <= words(done["text"])
