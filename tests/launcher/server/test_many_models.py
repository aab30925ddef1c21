"""Many models behind one endpoint, with two real servers on loopback.

B = `llm serve --served-name up-smol --api-key KB` (the default model). A = SmolLM2 and all-MiniLM-L6-v2 as
local models, each in its own engine process, and B as an upstream (models = ["*"]). The official openai
client talks to A as to any server."""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.launcher.server.conftest import start_cli_server, start_server

B_KEY = "KB"
A2_KEY = "KA"
CHAT = [{"role": "user", "content": "Name three colors."}]


class B:
    """Server B, restartable on the same port."""

    def __init__(self, gguf: str, tmp):
        self.gguf, self.tmp = gguf, tmp
        self.srv = None
        self.port = None

    def start(self):
        self.srv = start_cli_server(["--model", self.gguf, "--served-name", "up-smol", "--api-key", B_KEY,
                                     "--device", "cpu", "--kv-cache-gib", "0.25", "--max-model-len", "2048"],
                                    self.tmp, api_key=B_KEY, model_path=self.gguf, port=self.port)
        self.port = int(self.srv.url.rsplit(":", 1)[1])
        return self.srv

    def stop(self):
        if self.srv is not None:
            self.srv.stop()


@pytest.fixture(scope="module")
def b(default_gguf_path, tmp_path_factory):
    server = B(default_gguf_path, tmp_path_factory.mktemp("b"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def a(b, default_gguf_path, minilm_dir, tmp_path_factory):
    srv = start_server(f"""
[model]
source = "{default_gguf_path}"
served_names = ["smol"]
max_model_len = 2048

[engine]
device = "cpu"
kv_cache_gib = 0.25

[[models]]
source = "{minilm_dir}"
served_names = ["minilm"]
max_model_len = 256
[models.engine]
enable_prefix_caching = false

[[upstreams]]
name = "b"
engine = "vllm"
base_url = "{b.srv.url}/v1"
models = ["*"]
refresh_s = 1
""", tmp_path_factory.mktemp("a"), api_key=None, model_path=default_gguf_path)
    yield srv
    srv.stop()


def models_of(srv, key: str | None = None) -> dict[str, dict]:
    """The listing; with `key`, as a caller holding that key asks (A forwards it to B's listing)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return {m["id"]: m for m in httpx.get(srv.url + "/v1/models", headers=headers, timeout=60).json()["data"]}


def test_one_listing_for_local_models_and_the_upstream(a):
    cards = models_of(a, B_KEY)
    assert set(cards) == {"smol", "minilm", "up-smol"}
    assert [cards[m]["provider"] for m in ("smol", "minilm", "up-smol")] == ["llm", "llm", "b"]
    assert cards["up-smol"]["owned_by"] == "b" and cards["smol"]["owned_by"] == "llm"
    assert cards["smol"]["capabilities"] == ["chat", "completion"]
    assert cards["minilm"]["capabilities"] == ["embedding", "score", "rerank", "pooling"]
    assert cards["up-smol"]["capabilities"] == ["chat", "completion"]    # as B's own listing says
    assert cards["smol"]["context_window"] == cards["up-smol"]["context_window"] == 2048
    assert cards["minilm"]["context_window"] == 256
    assert [cards[m]["status"] for m in ("smol", "minilm", "up-smol")] == ["loaded", "loaded", "available"]
    client = openai.OpenAI(base_url=a.base_url, api_key=B_KEY, max_retries=0)
    assert {m.id for m in client.models.list().data} == set(cards)
    assert client.models.retrieve("up-smol").owned_by == "b"


def test_a_chat_through_a_equals_b_directly(a, b):
    via_a = openai.OpenAI(base_url=a.base_url, api_key=B_KEY, max_retries=0, timeout=120)   # A forwards it
    direct = openai.OpenAI(base_url=b.srv.base_url, api_key=B_KEY, max_retries=0, timeout=120)
    kw = dict(model="up-smol", messages=CHAT, temperature=0, max_tokens=24)
    assert via_a.chat.completions.create(**kw).choices[0].message.content == \
        direct.chat.completions.create(**kw).choices[0].message.content

    def chunks(client):
        return [c.choices[0].delta.content for c in client.chat.completions.create(**kw, stream=True)
                if c.choices and c.choices[0].delta.content]

    through, straight = chunks(via_a), chunks(direct)
    assert len(through) == len(straight) > 3 and "".join(through) == "".join(straight)


def test_embeddings_and_chat_run_concurrently_on_a(a):
    """Each model has its own engine process: embeddings are answered while a chat on the other model is still
    streaming, not queued behind it. Ordered by events, not a fixed wait: the chat may last up to 1,500 tokens
    (seconds on any machine), and is cut short once the embeddings are back and another chunk has come."""
    client = openai.AsyncOpenAI(base_url=a.base_url, api_key="unused", max_retries=0, timeout=120)
    streaming = asyncio.Event()
    embedded = asyncio.Event()
    seen: dict[str, bool] = {}

    async def chat():
        stream = await client.chat.completions.create(model="smol", messages=CHAT, max_tokens=1500, stream=True,
                                                      extra_body={"ignore_eos": True})
        async for _ in stream:
            streaming.set()
            if embedded.is_set():   # a chunk after the embeddings came back: the chat was still generating
                seen["chat_after_embeddings"] = True
                break
        await stream.close()   # leaving early aborts the rest of the generation

    async def embed():
        await streaming.wait()
        for _ in range(3):
            out = await client.embeddings.create(model="minilm", input=["a red apple", "a green pear"])
            assert len(out.data) == 2 and len(out.data[0].embedding) == 384
        embedded.set()

    async def both():
        await asyncio.gather(chat(), embed())
        await client.close()

    asyncio.run(both())
    assert seen.get("chat_after_embeddings"), "the embeddings waited for the chat to end"


def test_the_callers_key_is_forwarded_and_a_servers_own_key_never_is(a, b, tmp_path):
    body = {"model": "up-smol", "messages": CHAT, "max_tokens": 4}
    refused = httpx.post(a.url + "/v1/chat/completions", json=body, timeout=120)   # no key: B's 401, as it came
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.post(a.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {B_KEY}"},
                    timeout=120)
    assert ok.status_code == 200, ok.text
    # A2 checks keys of its own: KA lets a client in, and KA must not reach B (B would refuse it); A2 sends
    # the upstream's own key instead.
    a2 = start_server(f"""
[model]
enabled = false

[[upstreams]]
name = "b"
engine = "vllm"
base_url = "{b.srv.url}/v1"
api_key_env = "B_KEY"
""", tmp_path, api_key=A2_KEY, env={"B_KEY": B_KEY})
    try:
        r = httpx.post(a2.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {A2_KEY}"},
                       timeout=120)
        assert r.status_code == 200, r.text
        wrong = httpx.post(a2.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {B_KEY}"},
                           timeout=120)
        assert wrong.status_code == 401   # A2's own check: B's key is not A2's
    finally:
        a2.stop()


def test_the_gateway_environment_mode(b, tmp_path):
    env = {"MAIN_MODEL_ENGINE": "vllm", "MAIN_MODEL_BASE_URL": f"{b.srv.url}/v1"}
    gw = start_server("[model]\nenabled = false\n", tmp_path, api_key=None, env=env)
    try:
        refused = httpx.get(gw.url + "/v1/models", params={"provider": "vllm"}, timeout=60)
        assert refused.status_code == 401   # no key to forward: B's refusal, as the document says
        cards = models_of(gw, B_KEY)
        assert list(cards) == ["up-smol"] and cards["up-smol"]["owned_by"] == "vllm"
        r = httpx.post(gw.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {B_KEY}"}, timeout=120,
                       json={"model": "up-smol", "messages": CHAT, "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert any("upstream 'vllm' (vllm)" in line for line in gw.log_path.read_text().splitlines())
    finally:
        gw.stop()
    unknown = start_server("[model]\nenabled = false\n", tmp_path, api_key=None, env={"MAIN_MODEL_ENGINE": "mystery"})
    try:
        assert httpx.get(unknown.url + "/v1/models", timeout=30).json() == {"object": "list", "data": []}
    finally:
        unknown.stop()


def test_b_gone_then_back(a, b):
    """Last in this module: it stops B. A keeps its local models, answers 502 for B's, and routes to B
    again once B is back on its port, without a restart."""
    b.stop()
    cards = models_of(a)
    assert {"smol", "minilm"} <= set(cards) and "up-smol" not in cards
    r = httpx.post(a.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {B_KEY}"}, timeout=120,
                   json={"model": "up-smol", "messages": CHAT, "max_tokens": 4})
    assert r.status_code == 502 and set(r.json()["error"]) >= {"message", "type", "param", "code"}
    local = httpx.post(a.url + "/v1/chat/completions", timeout=120,
                       json={"model": "smol", "messages": CHAT, "max_tokens": 4})
    assert local.status_code == 200
    b.start()
    r = httpx.post(a.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {B_KEY}"}, timeout=120,
                   json={"model": "up-smol", "messages": CHAT, "max_tokens": 4})
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while "up-smol" not in models_of(a, B_KEY) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "up-smol" in models_of(a, B_KEY)
