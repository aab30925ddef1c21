"""/score, /rerank (Jina's and Cohere's shapes), /pooling and /classify over real HTTP: all-MiniLM-L6-v2 (cosine
similarity of its embeddings) and random cross-encoder / classifier checkpoints served from tmp HF directories."""
import base64
import shutil

import httpx
import numpy as np
import pytest
import torch

from tests.launcher.server.conftest import ALIAS, ALLOWED_ORIGIN, MINILM, start_server

ALIAS_MINILM = "minilm"   # embed_server's other served name

# (query, documents, index of the relevant one): hand-written, one clear answer each.
RERANK_SETS = [
    ("How do I reset my router's password?",
     ["The Eiffel Tower was finished in 1889 for the World's Fair.",
      "Hold the reset button on the back of the router for ten seconds to restore the default password.",
      "Bananas are rich in potassium and easy to digest.",
      "The orchestra rehearsed the symphony twice before the concert."], 1),
    ("What do pandas eat?",
     ["Giant pandas eat bamboo almost exclusively, up to forty kilograms a day.",
      "The stock market closed higher after the interest rate announcement.",
      "Python lists can be sorted in place with the sort method.",
      "Rain is expected across the northern region this weekend."], 0),
    ("Which planet is the largest in the solar system?",
     ["A good sourdough starter needs flour, water and patience.",
      "The committee postponed the vote until next month.",
      "Running shoes should be replaced every few hundred miles.",
      "Jupiter is the largest planet in our solar system, more than eleven times wider than Earth."], 3),
    ("How can I make my coffee less bitter?",
     ["The museum opens at nine on weekdays and ten on weekends.",
      "Glaciers carve U-shaped valleys as they move downhill.",
      "Use water just below boiling and a coarser grind to make coffee taste less bitter.",
      "The novel follows two sisters during the war."], 2),
    ("What is the boiling point of water at sea level?",
     ["At sea level, water boils at 100 degrees Celsius.",
      "Tennis players change ends after every odd game.",
      "The company hired twenty new engineers this quarter.",
      "Owls can rotate their heads about 270 degrees."], 0),
    ("How do vaccines protect against disease?",
     ["The bridge was closed for repairs over the holiday.",
      "Vaccines train the immune system to recognise a pathogen so the body can fight it off quickly.",
      "Chess openings are studied by players of every level.",
      "Autumn leaves change colour as chlorophyll breaks down."], 1),
    ("Where can I park my car near the airport?",
     ["Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
      "The recipe calls for two eggs and a cup of milk.",
      "Long-stay car parks next to the airport terminal offer parking by the day.",
      "The violinist tuned her instrument before the performance."], 2),
    ("Why is the sky blue?",
     ["Our team meeting has moved to Thursday afternoon.",
      "Sunlight is scattered by air molecules, and blue light scatters the most, so the sky looks blue.",
      "Cats sleep for up to sixteen hours a day.",
      "The library extended its opening hours during exams."], 1),
    ("How do I learn to play the guitar?",
     ["Volcanic eruptions can cool the climate for a year or two.",
      "The train to the coast leaves every half hour.",
      "Tax returns are due at the end of April.",
      "Beginners learning the guitar should practise simple chords like G, C and D every day."], 3),
    ("What are the symptoms of dehydration?",
     ["Thirst, dark urine, headache and dizziness are common symptoms of dehydration.",
      "The startup raised its first round of funding in March.",
      "Mount Everest lies on the border between Nepal and China.",
      "The painting was restored after decades in storage."], 0),
]


def post(srv, path: str, body: dict, status: int = 200) -> dict:
    r = httpx.post(srv.url + path, json=body, headers=srv.auth, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def embed(srv, texts: list[str]) -> np.ndarray:
    data = post(srv, "/v1/embeddings", {"model": MINILM, "input": texts})["data"]
    return np.array([d["embedding"] for d in data], dtype=np.float64)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# -- all-MiniLM-L6-v2: cosine similarity of its embeddings ---------------------------------------------------------

def test_capabilities_say_what_it_serves(embed_server):
    card = httpx.get(embed_server.url + f"/v1/models/{MINILM}", headers=embed_server.auth, timeout=30).json()
    assert card["capabilities"] == ["embedding", "score", "rerank", "pooling"]


def test_score_equals_cosine_of_embeddings(embed_server):
    query, docs, _ = RERANK_SETS[0]
    want = cosines(embed(embed_server, [query] * len(docs)), embed(embed_server, docs))
    one_to_many = post(embed_server, "/score", {"model": MINILM, "text_1": query, "text_2": docs})
    assert one_to_many["object"] == "list" and one_to_many["model"] == MINILM
    assert [d["index"] for d in one_to_many["data"]] == [0, 1, 2, 3]
    assert {d["object"] for d in one_to_many["data"]} == {"score"}
    np.testing.assert_allclose([d["score"] for d in one_to_many["data"]], want, atol=1e-5)
    tokens = len(httpx.post(embed_server.url + "/tokenize", json={"model": MINILM, "prompt": query}).json()["tokens"])
    assert one_to_many["usage"]["prompt_tokens"] > tokens and one_to_many["usage"]["completion_tokens"] == 0
    # Two lists: zipped. vLLM's newer names (queries / documents) and /v1/score too.
    firsts = [s[0] for s in RERANK_SETS[:3]]
    seconds = [s[1][s[2]] for s in RERANK_SETS[:3]]
    zipped = post(embed_server, "/v1/score", {"model": ALIAS_MINILM, "queries": firsts, "documents": seconds})
    np.testing.assert_allclose([d["score"] for d in zipped["data"]],
                               cosines(embed(embed_server, firsts), embed(embed_server, seconds)), atol=1e-5)
    single = post(embed_server, "/score", {"model": MINILM, "text_1": query, "text_2": docs[1]})
    assert len(single["data"]) == 1 and abs(single["data"][0]["score"] - want[1]) < 1e-5


@pytest.mark.parametrize("query, docs, relevant", RERANK_SETS, ids=[s[0][:24] for s in RERANK_SETS])
def test_rerank_puts_the_relevant_document_first(embed_server, query, docs, relevant):
    out = post(embed_server, "/rerank", {"model": MINILM, "query": query, "documents": docs})
    scores = [r["relevance_score"] for r in out["results"]]
    assert out["results"][0]["index"] == relevant, out["results"]
    assert scores == sorted(scores, reverse=True) and sorted(r["index"] for r in out["results"]) == [0, 1, 2, 3]
    want = cosines(embed(embed_server, [query] * len(docs)), embed(embed_server, docs))
    np.testing.assert_allclose([want[r["index"]] for r in out["results"]], scores, atol=1e-5)


def test_top_n(embed_server):
    query, docs, relevant = RERANK_SETS[3]
    for top_n, count in [(1, 1), (2, 2), (10, 4), (0, 4)]:
        out = post(embed_server, "/rerank", {"model": MINILM, "query": query, "documents": docs, "top_n": top_n})
        assert len(out["results"]) == count and out["results"][0]["index"] == relevant
    out = post(embed_server, "/v2/rerank", {"model": MINILM, "query": query, "documents": docs, "top_n": 3})
    assert len(out["results"]) == 3 and out["results"][0]["index"] == relevant


def test_jina_response_shape(embed_server):
    query, docs, relevant = RERANK_SETS[5]
    out = post(embed_server, "/v1/rerank", {"model": MINILM, "query": query, "documents": docs, "top_n": 2})
    assert set(out) == {"id", "model", "usage", "results"}
    assert isinstance(out["id"], str) and out["id"] and out["model"] == MINILM
    assert set(out["usage"]) == {"total_tokens"} and out["usage"]["total_tokens"] > 0
    for r in out["results"]:
        assert set(r) == {"index", "document", "relevance_score"}
        assert r["document"] == {"text": docs[r["index"]]} and isinstance(r["relevance_score"], float)
    assert out["results"][0]["index"] == relevant
    bare = post(embed_server, "/rerank", {"model": MINILM, "query": query, "documents": docs,
                                          "return_documents": False})
    assert all(set(r) == {"index", "relevance_score"} for r in bare["results"])


def test_cohere_response_shape(embed_server):
    query, docs, relevant = RERANK_SETS[7]
    out = post(embed_server, "/v2/rerank", {"model": MINILM, "query": query, "documents": docs})
    assert set(out) == {"id", "results", "meta"} and isinstance(out["id"], str)
    assert out["meta"] == {"api_version": {"version": "2", "is_experimental": False},
                           "billed_units": {"search_units": 1}}
    assert all(set(r) == {"index", "relevance_score"} for r in out["results"])   # documents only when asked
    assert out["results"][0]["index"] == relevant
    # Cohere's {"text": ...} documents, and return_documents.
    objects = post(embed_server, "/v2/rerank", {"model": MINILM, "query": query, "return_documents": True,
                                               "documents": [{"text": d} for d in docs]})
    assert [r["document"] for r in objects["results"]] == [{"text": docs[r["index"]]} for r in out["results"]]
    np.testing.assert_allclose([r["relevance_score"] for r in objects["results"]],
                               [r["relevance_score"] for r in out["results"]], atol=1e-6)
    many = post(embed_server, "/v2/rerank", {"model": MINILM, "query": query, "documents": ["x"] * 101, "top_n": 1})
    assert many["meta"]["billed_units"] == {"search_units": 2}


def test_pooling_equals_embeddings(embed_server):
    texts = ["A man is eating food.", "The stock market fell sharply today.", "Hi"]
    want = embed(embed_server, texts)
    out = post(embed_server, "/pooling", {"model": MINILM, "input": texts})
    assert out["object"] == "list" and [d["object"] for d in out["data"]] == ["pooling"] * 3
    np.testing.assert_allclose([d["data"] for d in out["data"]], want, atol=1e-6)
    b64 = post(embed_server, "/pooling", {"model": MINILM, "input": texts[0], "encoding_format": "base64"})
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(b64["data"][0]["data"]), np.float32), want[0], atol=1e-6)
    # Per-token hidden states: one row per token; mean-pooled and normalized they are the embedding.
    tokens = post(embed_server, "/pooling", {"model": MINILM, "input": texts, "task": "token_embed"})
    ids = [httpx.post(embed_server.url + "/tokenize", json={"model": MINILM, "prompt": t}).json()["tokens"]
           for t in texts]
    for row, token_ids, vector in zip(tokens["data"], ids, want):
        states = np.array(row["data"])
        assert states.shape == (len(token_ids), 384)
        mean = states.mean(0)
        np.testing.assert_allclose(mean / np.linalg.norm(mean), vector, atol=1e-5)
    assert tokens["usage"]["prompt_tokens"] == sum(map(len, ids))


def test_truncate_prompt_tokens(embed_server):
    long = "word " * 400
    r = httpx.post(embed_server.url + "/score", headers=embed_server.auth, timeout=30,
                   json={"model": MINILM, "text_1": "word", "text_2": long})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    out = post(embed_server, "/score",
               {"model": MINILM, "text_1": "word", "text_2": long, "truncate_prompt_tokens": 10})
    want = cosines(embed(embed_server, ["word"]), embed(embed_server, ["word " * 8]))   # [CLS] + 8 + [SEP]
    np.testing.assert_allclose(out["data"][0]["score"], want[0], atol=1e-5)
    assert out["usage"]["prompt_tokens"] == 3 + 10


@pytest.mark.parametrize("path, body, param", [
    ("/score", {"text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, "text_2"),
    ("/score", {"text_1": "a"}, "text_2"),
    ("/score", {"text_1": [], "text_2": "x"}, "text_1"),
    ("/rerank", {"query": "q", "documents": []}, "documents"),
    ("/rerank", {"query": "q", "documents": ["d"], "top_n": -1}, "top_n"),
    ("/v2/rerank", {"query": "q", "documents": ["d"], "top_n": 0}, "top_n"),
    ("/rerank", {"documents": ["d"]}, "query"),
    ("/rerank", {"query": "q", "documents": [{"title": "no text"}]}, "documents"),
    ("/rerank", {"query": "q", "documents": ["d"], "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 100000}, "truncate_prompt_tokens"),
    ("/pooling", {"input": "x", "task": "classify"}, "task"),
    ("/pooling", {"input": "x", "task": "nope"}, "task"),
    ("/classify", {"input": "x"}, "model"),
])
def test_bad_requests_are_400(embed_server, path, body, param):
    r = httpx.post(embed_server.url + path, headers=embed_server.auth, timeout=30, json={"model": MINILM, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], error
    assert httpx.get(embed_server.url + "/health/ready", timeout=10).status_code == 200


def test_openapi_and_preflights(embed_server):
    spec = httpx.get(embed_server.url + "/openapi.json", timeout=30).json()
    assert {"/pooling", "/classify", "/score", "/rerank", "/v2/rerank"} <= set(spec["paths"])
    for path in ("/pooling", "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"):
        pre = httpx.options(embed_server.url + path, timeout=30,
                            headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == ALLOWED_ORIGIN, path


def test_a_key_is_needed(embed_server):
    r = httpx.post(embed_server.url + "/rerank", json={"model": MINILM, "query": "q", "documents": ["d"]}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_a_chat_model_cannot_rerank(server):
    for path, body in [("/rerank", {"query": "q", "documents": ["d"]}), ("/score", {"text_1": "a", "text_2": "b"}),
                       ("/classify", {"input": "x"}), ("/pooling", {"input": "x"})]:
        r = httpx.post(server.url + path, headers=server.auth, timeout=30, json={"model": ALIAS, **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "model_not_supported" and error["param"] == "model"
        assert "chat, completion" in error["message"] and "no model on this server does" in error["message"]
    assert httpx.get(server.url + "/health/ready", timeout=10).status_code == 200


# -- a random cross-encoder and a 3-label classifier, from tmp HF directories ----------------------------------------

@pytest.fixture(scope="module")
def classifier_dirs(minilm_dir, tmp_path_factory):
    """(cross-encoder dir, classifier dir): tiny random BERTs with all-MiniLM-L6-v2's tokenizer."""
    import transformers as tf
    dirs = []
    for name, labels in [("cross", {0: "LABEL_0"}), ("sentiment", {0: "negative", 1: "neutral", 2: "positive"})]:
        torch.manual_seed(len(labels))
        cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=128, id2label=labels,
                            label2id={v: k for k, v in labels.items()})
        model = tf.BertForSequenceClassification(cfg).eval()
        with torch.no_grad():
            model.classifier.weight.mul_(20.0)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            shutil.copy(f"{minilm_dir}/{f}", path / f)
        dirs.append(path)
    return dirs


@pytest.fixture(scope="module")
def cross_server(classifier_dirs, tmp_path_factory):
    cross, sentiment = classifier_dirs
    srv = start_server(f"""
[model]
source = "{cross}"
served_names = ["cross"]

[engine]
device = "cpu"

[[models]]
source = "{sentiment}"
served_names = ["sentiment"]
""", tmp_path_factory.mktemp("cross"), model_path=str(cross))
    try:
        yield srv
    finally:
        srv.stop()


def hf_logits(path, texts, pairs=None, max_length=None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()
    batch = tok(texts, pairs, padding=True, truncation=max_length is not None, max_length=max_length,
                return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_cross_encoder_score_and_rerank(cross_server, classifier_dirs):
    query, docs, _ = RERANK_SETS[2]
    want = torch.sigmoid(hf_logits(classifier_dirs[0], [query] * 4, docs)[:, 0]).numpy()
    out = post(cross_server, "/score", {"model": "cross", "text_1": query, "text_2": docs})
    np.testing.assert_allclose([d["score"] for d in out["data"]], want, atol=1e-5)
    truncated = post(cross_server, "/score", {"model": "cross", "text_1": query, "text_2": docs,
                                              "truncate_prompt_tokens": 12})
    cut = torch.sigmoid(hf_logits(classifier_dirs[0], [query] * 4, docs, max_length=12)[:, 0]).numpy()
    np.testing.assert_allclose([d["score"] for d in truncated["data"]], cut, atol=1e-5)
    assert truncated["usage"]["prompt_tokens"] == 4 * 12
    ranked = post(cross_server, "/rerank", {"model": "cross", "query": query, "documents": docs})
    assert [r["index"] for r in ranked["results"]] == list(np.argsort(-want, kind="stable"))
    np.testing.assert_allclose([r["relevance_score"] for r in ranked["results"]], np.sort(want)[::-1], atol=1e-5)
    cards = {c["id"]: c for c in httpx.get(cross_server.url + "/v1/models", headers=cross_server.auth).json()["data"]}
    assert cards["cross"]["capabilities"] == ["classify", "score", "rerank", "pooling"]
    assert cards["sentiment"]["capabilities"] == ["classify", "pooling"]


def test_classify(cross_server, classifier_dirs):
    texts = ["I loved this film.", "The service was slow and the food was cold.", "It is a chair."]
    want = torch.softmax(hf_logits(classifier_dirs[1], texts), -1).numpy()
    out = post(cross_server, "/classify", {"model": "sentiment", "input": texts})
    assert out["object"] == "list" and out["model"] == "sentiment"
    names = ["negative", "neutral", "positive"]
    for i, d in enumerate(out["data"]):
        assert set(d) == {"index", "label", "probs", "num_classes"} and d["index"] == i and d["num_classes"] == 3
        np.testing.assert_allclose(d["probs"], want[i], atol=1e-5)
        assert d["label"] == names[int(np.argmax(want[i]))]
    assert out["usage"]["prompt_tokens"] > len(texts)
    pooled = post(cross_server, "/pooling", {"model": "sentiment", "input": texts})   # a classifier pools its probs
    np.testing.assert_allclose([d["data"] for d in pooled["data"]], want, atol=1e-5)
    one = post(cross_server, "/classify", {"model": "cross", "input": "x"})["data"][0]
    assert one["num_classes"] == 1 and one["label"] == "LABEL_0"


def test_what_a_classifier_does_not_serve(cross_server):
    r = httpx.post(cross_server.url + "/rerank", headers=cross_server.auth, timeout=30,
                   json={"model": "sentiment", "query": "q", "documents": ["d"]})
    assert r.status_code == 400 and "models here that do: cross" in r.json()["error"]["message"]
    for path, body in [("/v1/embeddings", {"input": "x"}), ("/v1/chat/completions",
                                                             {"messages": [{"role": "user", "content": "hi"}]})]:
        r = httpx.post(cross_server.url + path, headers=cross_server.auth, timeout=30, json={"model": "cross", **body})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported", r.text
    assert httpx.get(cross_server.url + "/health/ready", timeout=10).status_code == 200
