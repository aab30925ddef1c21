"""/v1/embeddings with an encoder model (all-MiniLM-L6-v2) served by its own server process (embed_server)."""
import base64
import math

import httpx
import numpy as np
import openai
import pytest

from tests.launcher.server.conftest import API_KEY, MINILM as NAME   # served by conftest's embed_server


@pytest.fixture(scope="module")
def embed_client(embed_server):
    with openai.OpenAI(base_url=embed_server.base_url, api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_related_sentences_are_closer(embed_client):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    data = embed_client.embeddings.create(model=NAME, input=texts).data
    assert [d.index for d in data] == [0, 1, 2] and len(data[0].embedding) == 384
    related, unrelated = cosine(data[0].embedding, data[1].embedding), cosine(data[0].embedding, data[2].embedding)
    assert related > unrelated + 0.3


def test_matches_transformers_mean_pooling(embed_client, minilm_dir):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(minilm_dir), AutoModel.from_pretrained(minilm_dir).eval()
    texts = ["hello world", "Embeddings map sentences to vectors."]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    ours = torch.tensor([d.embedding for d in embed_client.embeddings.create(model="minilm", input=texts).data])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_base64_and_token_inputs(embed_server, embed_client):
    floats = embed_client.embeddings.create(model=NAME, input="hello", encoding_format="float").data[0].embedding
    r = httpx.post(embed_server.url + "/v1/embeddings", headers=embed_server.auth, timeout=30,
                   json={"model": NAME, "input": "hello", "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype=np.float32)
    np.testing.assert_allclose(decoded, floats, rtol=1e-6)
    ids = httpx.post(embed_server.url + "/tokenize", json={"model": NAME, "prompt": "hello"}, timeout=30).json()
    by_ids = embed_client.embeddings.create(model=NAME, input=[ids["tokens"]]).data[0].embedding
    np.testing.assert_allclose(by_ids, floats, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("body, param, code", [
    ({"input": "word " * 400}, "input", "context_length_exceeded"),
    ({"input": []}, "input", None),
    ({"input": 5}, "input", None),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format", None),
    ({"input": "x", "dimensions": 10}, "dimensions", None),
    ({"input": "x", "pooling": "last"}, "pooling", None),
])
def test_bad_embedding_requests_are_400(embed_server, body, param, code):
    r = httpx.post(embed_server.url + "/v1/embeddings", headers=embed_server.auth, timeout=30,
                   json={"model": NAME, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and (code is None or error["code"] == code), error


def test_generation_is_refused_for_an_embedding_model(embed_client):
    with pytest.raises(openai.BadRequestError):
        embed_client.completions.create(model=NAME, prompt="hello", max_tokens=5)
