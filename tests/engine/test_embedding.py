"""Embeddings against transformers: MiniLM with sentence-transformers pooling, and pooled decoder states."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from engine.core import EngineCore
from engine.embedding import EmbeddingModel, PoolingConfig, decoder_embed, pool_padded
from engine.loader import ModelFiles, load_config, load_model
from engine.tokenizer import Tokenizer
from engine.validation import InputTooLongError
from tests.engine.helpers import engine_config, tiny_hf_model

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market crashed today, wiping out billions of dollars in value across the major indices.",
    "Hi",
    "A cheetah is running behind its prey on the savanna.",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return EmbeddingModel.from_path(minilm_dir)


@pytest.fixture(scope="module")
def hf_minilm(minilm_dir):
    from transformers import AutoModel, AutoTokenizer
    return AutoModel.from_pretrained(minilm_dir).eval(), AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def token_ids(minilm_dir):
    tokenizer = Tokenizer.from_dir(minilm_dir)
    return [tokenizer.encode(s) for s in SENTENCES]


def hf_hidden(hf_minilm, token_ids):
    """transformers' last hidden states over a padded batch built by its own tokenizer."""
    model, tokenizer = hf_minilm
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    # The same ids reach both models: ours from engine.Tokenizer, theirs from BertTokenizerFast.
    assert [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])] == token_ids
    with torch.no_grad():
        return model(**enc).last_hidden_state, enc["attention_mask"]


def test_minilm_matches_sentence_transformers_semantics(minilm, hf_minilm, token_ids):
    assert minilm.pooling == PoolingConfig(modes=("mean",), normalize=True, max_seq_length=256)
    hidden, mask = hf_hidden(hf_minilm, token_ids)
    m = mask[..., None].float()
    expected = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    got = minilm.embed(token_ids)
    assert got.dtype == torch.float32 and got.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_padding_and_chunking_do_not_change_vectors(minilm, token_ids):
    batched = minilm.embed(token_ids)
    for i, ids in enumerate(token_ids):
        torch.testing.assert_close(minilm.embed([ids])[0], batched[i], atol=1e-6, rtol=0)
    # A small token budget splits the batch into several padded groups; the input order is kept.
    small = EmbeddingModel(minilm.model, minilm.pooling, max_batch_tokens=30)
    torch.testing.assert_close(small.embed(token_ids), batched, atol=1e-6, rtol=0)
    assert minilm.embed([]).shape == (0, 384)


def test_related_sentences_are_closer(minilm, token_ids):
    e = minilm.embed(token_ids)
    sim = e @ e.T
    assert sim[0, 1] > 0.5
    assert sim[0, 1] > sim[0, 2] + 0.4 and sim[0, 1] > sim[0, 4] + 0.3


def test_input_errors(minilm, token_ids):
    with pytest.raises(InputTooLongError, match=r"300 tokens.*maximum of 256") as info:
        minilm.embed([token_ids[0], [101] + [1037] * 298 + [102]])
    assert (info.value.index, info.value.num_tokens, info.value.max_tokens) == (1, 300, 256)
    minilm.embed([[101] + [1037] * 254 + [102]])  # exactly the maximum is fine
    with pytest.raises(ValueError, match="input 0 is empty"):
        minilm.embed([[]])
    with pytest.raises(ValueError, match=r"\[0, 30522\)"):
        minilm.embed([[101, 30522, 102]])


def test_cls_pooling_without_normalize_from_config(minilm_dir, hf_minilm, token_ids, tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json"):
        (tmp_path / name).symlink_to(f"{minilm_dir}/{name}")
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}))
    model = EmbeddingModel.from_path(tmp_path)
    assert model.pooling.modes == ("cls", "max") and not model.pooling.normalize
    assert model.dimensions == 768
    hidden, mask = hf_hidden(hf_minilm, token_ids)
    expected_max = hidden.masked_fill(mask[..., None] == 0, float("-inf")).amax(1)
    torch.testing.assert_close(model.embed(token_ids), torch.cat([hidden[:, 0], expected_max], -1),
                               atol=1e-5, rtol=0)


def test_unsupported_module_is_refused(minilm_dir, tmp_path):
    shutil.copy(f"{minilm_dir}/config.json", tmp_path / "config.json")
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match="Dense"):
        EmbeddingModel.from_path(tmp_path)


def test_pool_padded_modes_match_per_row_loops():
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 5)
    lens = [7, 2, 4]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lens])
    hidden[mask == 0] = 1e3  # garbage in padded rows must not leak into any mode
    rows = [hidden[b, :n] for b, n in enumerate(lens)]
    expected = {"cls": [r[0] for r in rows], "lasttoken": [r[-1] for r in rows],
                "max": [r.amax(0) for r in rows], "mean": [r.mean(0) for r in rows],
                "mean_sqrt_len": [r.sum(0) / len(r) ** 0.5 for r in rows]}
    for mode, want in expected.items():
        torch.testing.assert_close(pool_padded(hidden, mask, mode), torch.stack(want), msg=mode)


# -- decoder pooling -------------------------------------------------------------------------------

DECODER_LENGTHS = [5, 17, 1, 40, 16]


@pytest.fixture(scope="module", params=["llama3", "qwen3"])
def tiny_decoder(request, tmp_path_factory):
    """(HF model, our model loaded from its save_pretrained directory, that directory)."""
    hf = tiny_hf_model(request.param, seed=3)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    files = ModelFiles.at(path)
    ours = load_model(files, load_config(files), torch.float32, torch.device("cpu"), max_positions=128)
    return hf, ours, path


def decoder_prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in DECODER_LENGTHS]


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("normalize", [True, False])
def test_decoder_pooling_matches_transformers(tiny_decoder, pooling, normalize):
    hf, ours, _ = tiny_decoder
    prompts = decoder_prompts()
    expected = []
    with torch.no_grad():
        for ids in prompts:
            states = hf.model(input_ids=torch.tensor([ids])).last_hidden_state[0]   # after the final norm
            vec = states[-1] if pooling == "last" else states.mean(0)
            expected.append(F.normalize(vec, dim=-1) if normalize else vec)
    got = decoder_embed(ours, prompts, pooling=pooling, normalize=normalize)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)
    # Several packed groups (one of them a single over-budget input) give the same vectors.
    chunked = decoder_embed(ours, prompts, pooling=pooling, normalize=normalize, max_batch_tokens=20)
    torch.testing.assert_close(chunked, got, atol=1e-6, rtol=0)


def test_decoder_embed_through_engine_core(tiny_decoder):
    _, ours, path = tiny_decoder
    core = EngineCore(engine_config(path, max_model_len=64))
    prompts = decoder_prompts()
    torch.testing.assert_close(decoder_embed(core, prompts), decoder_embed(ours, prompts), atol=1e-6, rtol=0)
    assert core.stats().scheduler.num_blocks_used == 0
    with pytest.raises(InputTooLongError, match=r"65 tokens.*maximum of 64"):
        decoder_embed(core, [[5] * 65])
    with pytest.raises(ValueError, match="pooling"):
        decoder_embed(core, prompts, pooling="cls")
