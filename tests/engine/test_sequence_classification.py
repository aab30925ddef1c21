"""Sequence classifiers against transformers: BERT cross-encoders and label classifiers, XLM-RoBERTa, and
Llama / Qwen2 with a `score` head — random tiny checkpoints saved with save_pretrained."""
import numpy as np
import pytest
import torch

from engine.embedding_core import PoolingCore, pooling_facts
from engine.messages import EmbedRequest
from engine.models.sequence_classification import SequenceClassifier
from engine.tokenizer import Tokenizer
from tests.engine.helpers import TINY, engine_config

LENGTHS = [7, 19, 1, 33, 12]
ENCODER = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)


def _hf(kind: str):
    import transformers as tf
    torch.manual_seed(7)
    if kind == "bert-cross-encoder":
        return tf.BertForSequenceClassification(tf.BertConfig(**ENCODER, max_position_embeddings=64, num_labels=1))
    if kind == "bert-classifier":
        cfg = tf.BertConfig(**ENCODER, max_position_embeddings=64, hidden_act="gelu_new",
                            id2label={0: "negative", 1: "neutral", 2: "positive"},
                            label2id={"negative": 0, "neutral": 1, "positive": 2})
        return tf.BertForSequenceClassification(cfg)
    if kind == "xlm-roberta":
        cfg = tf.XLMRobertaConfig(**ENCODER, max_position_embeddings=66, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, type_vocab_size=1, num_labels=2)
        return tf.XLMRobertaForSequenceClassification(cfg)
    if kind == "llama":
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(**TINY, pad_token_id=0, num_labels=1))
    if kind == "qwen2":
        return tf.Qwen2ForSequenceClassification(tf.Qwen2Config(**TINY, pad_token_id=0, num_labels=3))
    raise ValueError(kind)


KINDS = ["bert-cross-encoder", "bert-classifier", "xlm-roberta", "llama", "qwen2"]


@pytest.fixture(scope="module", params=KINDS)
def classifier(request, tmp_path_factory):
    """(kind, HF model, its save_pretrained directory, ours loaded from it)."""
    hf = _hf(request.param).eval()
    with torch.no_grad():   # random heads give tiny logits: scale them so probabilities differ visibly
        for name, p in hf.named_parameters():
            if name.startswith(("classifier", "score")):
                p.mul_(8.0)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path, SequenceClassifier.from_path(path)


def inputs(kind: str):
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(3, 512, (n,), generator=g).tolist() for n in LENGTHS]
    if kind in ("llama", "qwen2"):
        ids[1] = ids[1] + [0, 0]   # trailing pad ids: HF pools at the last non-pad token, so must we
    types = None
    if kind.startswith("bert"):   # a cross-encoder's pairs: the second segment has token type 1
        types = [[0] * (n // 2) + [1] * (n - n // 2) for n in map(len, ids)]
    return ids, types


def hf_logits(hf, ids, types) -> torch.Tensor:
    """transformers one input at a time (no padding anywhere: the reference)."""
    rows = []
    with torch.no_grad():
        for i, x in enumerate(ids):
            kwargs = {} if types is None else {"token_type_ids": torch.tensor([types[i]])}
            rows.append(hf(torch.tensor([x]), **kwargs).logits[0])
    return torch.stack(rows)


def test_logits_and_probs_match_transformers(classifier):
    kind, hf, _, ours = classifier
    ids, types = inputs(kind)
    expected = hf_logits(hf, ids, types)
    got = ours.logits(ids, types)
    assert got.dtype == torch.float32 and got.shape == (len(ids), hf.config.num_labels)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    activate = torch.sigmoid if hf.config.num_labels == 1 else lambda x: torch.softmax(x, -1)
    torch.testing.assert_close(ours.probs(ids, types), activate(expected), atol=1e-4, rtol=0)
    assert ours.labels == tuple(hf.config.id2label[i] for i in range(hf.config.num_labels))


def test_batched_equals_alone(classifier):
    kind, _, _, ours = classifier
    ids, types = inputs(kind)
    batched = ours.logits(ids, types)
    for i, x in enumerate(ids):
        alone = ours.logits([x], None if types is None else [types[i]])
        torch.testing.assert_close(alone[0], batched[i], atol=1e-5, rtol=0)
    # A small token budget splits the batch into several groups; the input order is kept.
    small = SequenceClassifier(ours.backbone, ours.head, ours.config, ours.max_seq_length, max_batch_tokens=40)
    torch.testing.assert_close(small.logits(ids, types), batched, atol=1e-5, rtol=0)


def test_pooling_core_serves_classify_and_token_states(classifier):
    kind, hf, path, ours = classifier
    assert pooling_facts(path) == (True, ours.labels)
    core = PoolingCore(engine_config(path, max_model_len=None))
    assert core.info.is_embedding_model and core.info.labels == ours.labels
    ids, types = inputs(kind)
    out = core.embed(EmbedRequest("r", ids, task="classify", token_type_ids=types))
    np.testing.assert_allclose(out.probs, ours.probs(ids, types).numpy(), atol=1e-6)
    assert out.num_tokens == sum(map(len, ids))
    states = core.embed(EmbedRequest("t", ids, task="token_embed", token_type_ids=types))
    if kind in ("llama", "qwen2"):
        assert states.error_code == "not_supported"
        return
    base = getattr(hf, hf.base_model_prefix)
    with torch.no_grad():
        kwargs = {} if types is None else {"token_type_ids": torch.tensor([types[3]])}
        ref = base(torch.tensor([ids[3]]), **kwargs).last_hidden_state[0]
    assert [s.shape for s in states.token_embeddings] == [(len(x), 64) for x in ids]
    np.testing.assert_allclose(states.token_embeddings[3], ref.numpy(), atol=1e-4)


def test_max_length_and_positions(classifier):
    kind, hf, _, ours = classifier
    if kind == "xlm-roberta":   # positions start at pad_token_id + 1: two of the 66 are never used
        assert ours.max_seq_length == 64
        ids = [[0] + [5] * 62 + [2]]
        torch.testing.assert_close(ours.logits(ids), hf_logits(hf, ids, None), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="maximum"):
        ours.logits([[5] * (ours.max_seq_length + 1)])


@pytest.mark.parametrize("max_length", [None, 3, 8, 12, 13, 30])
def test_pair_encoding_matches_transformers(minilm_dir, max_length):
    from transformers import AutoTokenizer
    ours, theirs = Tokenizer.from_dir(minilm_dir), AutoTokenizer.from_pretrained(minilm_dir)
    pairs = [("What is the capital of France?", "Paris is the capital and largest city of France."),
             ("a much longer question about the weather in the mountains this weekend", "sunny"),
             ("same length here", "also same here"),
             ("Which planet is the largest in the solar system?", "The committee postponed the vote until next month.")]
    for a, b in pairs:
        ref = theirs(a, b, truncation=max_length is not None, max_length=max_length)
        assert ours.encode_pair(a, b, max_length) == (ref["input_ids"], ref["token_type_ids"]), (a, b, max_length)
        single = theirs(a, truncation=max_length is not None, max_length=max_length)["input_ids"]
        assert ours.encode_pair(a, None, max_length)[0] == single
