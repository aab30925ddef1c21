"""Image input through a real server and the official openai client: a tiny random LLaVA beside the default
text model; base64 images, two in one prompt, a follow-up turn served from the prefix cache, the Responses
API's input_image, and every bad input a 4xx in OpenAI's shape with the server still healthy."""
import base64
import io
import re

import httpx
import openai
import pytest
from PIL import Image

from tests.launcher.server.conftest import start_server
from tests.launcher.server.vision_model import IMAGE_TOKENS, save_tiny_llava

VISION, TEXT = "tiny-llava", "smol"


def png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    image = Image.new("RGB", size, color)
    for x in range(0, size[0], 3):          # some structure, so two colours give two different embeddings
        image.putpixel((x, x % size[1]), (255 - color[0], 17, 99))
    image.save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


RED, BLUE = data_url(png((220, 20, 20))), data_url(png((20, 20, 220), (64, 48)))


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def ask(*images: str, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [*(image_part(u) for u in images), {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    (root / "secret").mkdir()
    (root / "allowed" / "red.png").write_bytes(png((220, 20, 20)))
    (root / "secret" / "key.png").write_bytes(png((1, 2, 3)))
    return root


@pytest.fixture(scope="module")
def server(default_gguf_path, media, tmp_path_factory):
    llava = save_tiny_llava(default_gguf_path, tmp_path_factory.mktemp("llava"))
    srv = start_server(f"""
[model]
source = "{llava}"
served_names = ["{VISION}"]

[engine]
device = "cpu"
max_num_seqs = 8
limit_images_per_prompt = 2

[[models]]
source = "{default_gguf_path}"
served_names = ["{TEXT}"]
""", tmp_path_factory.mktemp("vision"), model_path=str(llava), env={"LLM_OFFLINE": "1"},
                       server_extra=f'allowed_media_dirs = ["{media / "allowed"}"]\nmax_image_bytes = 60000')
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0, timeout=120)


def metric(srv, name: str, model: str = VISION) -> float:
    text = httpx.get(srv.url + "/metrics").text
    return float(re.search(rf'^llm:{name}{{model_name="{re.escape(model)}"}} (\S+)$', text, re.M).group(1))


def count(srv, messages: list[dict]) -> int:
    r = httpx.post(srv.url + "/tokenize", json={"model": VISION, "messages": messages, "add_generation_prompt": True},
                   headers=srv.auth, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["count"]


def chat(client, messages, **kw):
    return client.chat.completions.create(model=VISION, messages=messages, max_tokens=6, temperature=0, **kw)


def test_models_list_the_vision_capability(server):
    catalogue = {m["id"]: m for m in httpx.get(server.url + "/api/models", headers=server.auth).json()["models"]}
    assert "vision" in catalogue[VISION]["capabilities"] and "vision" not in catalogue[TEXT]["capabilities"]


def test_a_base64_image_counts_its_tokens_and_changes_the_answer(server, client):
    text_only = count(server, [{"role": "user", "content": "What is in the picture?"}])
    assert count(server, ask(RED)) == text_only + IMAGE_TOKENS
    red = chat(client, ask(RED), logprobs=True, top_logprobs=3)
    assert red.usage.prompt_tokens == text_only + IMAGE_TOKENS and red.usage.completion_tokens == 6
    again = chat(client, ask(RED), logprobs=True, top_logprobs=3)
    blue = chat(client, ask(BLUE), logprobs=True, top_logprobs=3)
    assert again.choices[0].message.content == red.choices[0].message.content
    first = lambda r: [t.logprob for t in r.choices[0].logprobs.content[0].top_logprobs]   # noqa: E731
    assert first(again) == pytest.approx(first(red), abs=1e-5)
    assert first(blue) != pytest.approx(first(red), abs=1e-5)   # the image reaches the model


def test_two_images_in_one_prompt_and_streaming(server, client):
    both = chat(client, ask(RED, BLUE, text="Compare them."))
    assert both.usage.prompt_tokens == count(server, [{"role": "user", "content": "Compare them."}]) + 2 * IMAGE_TOKENS
    stream = client.chat.completions.create(model=VISION, messages=ask(RED, BLUE, text="Compare them."), max_tokens=6,
                                            temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == both.choices[0].message.content


def test_a_follow_up_turn_reuses_the_image_from_the_prefix_cache(server, client):
    photo = data_url(png((10, 200, 10), (33, 71)))
    first = chat(client, ask(photo, text="Describe it at length, please, with care."))
    hits, encoded = metric(server, "prefix_cache_hits_total"), metric(server, "mm_cache_queries_total")
    follow_up = ask(photo, text="Describe it at length, please, with care.") + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And its colour?"}]
    second = chat(client, follow_up)
    assert second.usage.prompt_tokens_details.cached_tokens >= IMAGE_TOKENS
    assert metric(server, "prefix_cache_hits_total") - hits >= IMAGE_TOKENS
    # every block holding the image came from the cache: the image was not run through the tower again
    assert metric(server, "mm_cache_queries_total") == encoded


def test_a_file_url_under_the_allowed_folder(server, client, media):
    from_file = chat(client, ask(f"file://{media}/allowed/red.png"))
    assert from_file.choices[0].message.content == chat(client, ask(RED)).choices[0].message.content


def test_responses_input_image(server, client):
    response = client.responses.create(model=VISION, max_output_tokens=6, temperature=0, input=[
        {"role": "user", "content": [{"type": "input_image", "image_url": RED},
                                     {"type": "input_text", "text": "What is in the picture?"}]}])
    assert response.status in ("completed", "incomplete") and response.usage.input_tokens == count(server, ask(RED))


def _refused(server, messages, status: int, code: str | None, model: str = VISION) -> dict:
    r = httpx.post(server.base_url + "/chat/completions", headers=server.auth, timeout=60,
                   json={"model": model, "messages": messages, "max_tokens": 2})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_bad_images_are_openai_shaped_4xx_and_the_server_stays_healthy(server, media):
    blocks = metric(server, "kv_cache_blocks_used")
    cases = [
        (ask(data_url(b"just some text, not a picture")), "invalid_image"),
        (ask(data_url(png((9, 9, 9), (200, 200))[:300])), "invalid_image"),                 # truncated PNG
        (ask(data_url(png((9, 9, 9), (300, 300)) + b"\0" * 70000)), "image_too_large"),     # over max_image_bytes
        (ask(RED, BLUE, RED), "too_many_images"),
        (ask("http://127.0.0.1:9/cat.png"), "offline"),
        (ask(f"file://{media}/secret/key.png"), "forbidden_path"),
        (ask(f"file://{media}/allowed/../secret/key.png"), "forbidden_path"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], None),
    ]
    for messages, code in cases:
        error = _refused(server, messages, 400, code)
        assert error["param"].startswith("messages"), error
    error = _refused(server, ask(RED), 400, "model_not_supported", model=TEXT)
    assert f"models here that do: {VISION}" in error["message"]
    assert httpx.get(server.url + "/health/ready").status_code == 200
    assert metric(server, "kv_cache_blocks_used") == blocks
    assert chat(openai.OpenAI(base_url=server.base_url, api_key=server.api_key), ask(RED)).usage.completion_tokens == 6
