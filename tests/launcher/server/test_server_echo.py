"""Completions echo + logprobs (prompt logprobs) through the official client, checked against transformers."""
from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.launcher.server.conftest import PRIMARY

PROMPT = "The quick brown fox jumps over the lazy dog because it"
OTHER = "In 1492, Columbus sailed"
TOL = 1e-3


@pytest.fixture(scope="module")
def reference(default_gguf_path: str, hf_tokenizer):
    """prompt -> (token ids, log_softmax of transformers' logits [T, V]) on the same GGUF, in float32."""
    import torch
    from transformers import AutoModelForCausalLM
    path = Path(default_gguf_path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    out = {}
    with torch.inference_mode():
        for prompt in (PROMPT, OTHER):
            ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([ids])).logits[0].float()
            out[prompt] = (ids, torch.log_softmax(logits, dim=-1))
    return out


def _check_prompt_part(lp, ids, log_probs, hf_tokenizer, k: int) -> None:
    """The first len(ids) logprobs entries are the prompt's: null first, then transformers' values."""
    n = len(ids)
    assert lp.tokens[:n] == [hf_tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[:n] == [sum(len(t) for t in lp.tokens[:i]) for i in range(n)]
    for t in range(1, n):
        expected = log_probs[t - 1, ids[t]].item()   # logits at t-1 predict token t
        assert abs(lp.token_logprobs[t] - expected) < TOL, (t, lp.token_logprobs[t], expected)
        top = lp.top_logprobs[t]
        assert top[lp.tokens[t]] == lp.token_logprobs[t]        # the prompt token is always listed
        values, top_ids = log_probs[t - 1].topk(k)
        assert k <= len(top) <= k + 1
        for token_id, value in zip(list(top_ids), values.tolist()):
            text = hf_tokenizer.decode([int(token_id)])
            assert abs(top[text] - value) < TOL, (t, text, top[text], value)


def _echo(client, prompt, **kw):
    return client.completions.create(model=PRIMARY, prompt=prompt, temperature=0, echo=True, **kw)


def test_echo_logprobs_match_transformers(client, reference, hf_tokenizer):
    ids, log_probs = reference[PROMPT]
    r = _echo(client, PROMPT, max_tokens=5, logprobs=3, extra_body={"ignore_eos": True})
    plain = client.completions.create(model=PRIMARY, prompt=PROMPT, temperature=0, max_tokens=5, logprobs=3,
                                      extra_body={"ignore_eos": True})
    choice, gen = r.choices[0], plain.choices[0]
    assert choice.text == PROMPT + gen.text and choice.finish_reason == "length"
    lp, n = choice.logprobs, len(ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 5
    _check_prompt_part(lp, ids, log_probs, hf_tokenizer, k=3)
    # after the prompt: the generated tokens, as without echo, their offsets continuing from the prompt's
    assert lp.tokens[n:] == gen.logprobs.tokens
    assert all(abs(a - b) < 1e-4 for a, b in zip(lp.token_logprobs[n:], gen.logprobs.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(n + 5)]
    assert "".join(lp.tokens) == choice.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n, 5)


def test_echo_logprobs_streamed_equals_non_streamed(client, reference, hf_tokenizer):
    ids, log_probs = reference[PROMPT]
    full = _echo(client, PROMPT, max_tokens=4, logprobs=2).choices[0]
    chunks = [c for c in _echo(client, PROMPT, max_tokens=4, logprobs=2, stream=True) if c.choices]
    first = chunks[0].choices[0]
    assert first.text.startswith(PROMPT)
    assert len(first.logprobs.tokens) >= len(ids)   # the prompt's logprobs come whole, in the first chunk
    _check_prompt_part(first.logprobs, ids, log_probs, hf_tokenizer, k=2)
    assert "".join(c.choices[0].text for c in chunks) == full.text
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks for v in c.choices[0].logprobs.token_logprobs]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert tokens == full.logprobs.tokens and offsets == full.logprobs.text_offset
    assert values[0] is None and all(abs(a - b) < 1e-4 for a, b in zip(values[1:], full.logprobs.token_logprobs[1:]))


def test_echo_logprobs_token_prompts_and_n(client, reference, hf_tokenizer):
    """Token-id prompts, two prompts, n=2, logprobs=0: each choice carries its own prompt's logprobs."""
    (ids_a, lp_a), (ids_b, lp_b) = reference[PROMPT], reference[OTHER]
    r = client.completions.create(model=PRIMARY, prompt=[ids_a, ids_b], n=2, max_tokens=2, logprobs=0, echo=True,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for choice, (ids, log_probs) in zip(r.choices, [(ids_a, lp_a), (ids_a, lp_a), (ids_b, lp_b), (ids_b, lp_b)]):
        assert choice.text.startswith(hf_tokenizer.decode(ids))
        _check_prompt_part(choice.logprobs, ids, log_probs, hf_tokenizer, k=0)
        assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])   # logprobs=0: the token itself
    assert r.usage.prompt_tokens == len(ids_a) + len(ids_b)   # per prompt, as vLLM counts (not per sample)


@pytest.mark.parametrize("stream", [False, True])
def test_echo_max_tokens_zero_scores_the_prompt(client, reference, hf_tokenizer, stream):
    ids, log_probs = reference[OTHER]
    kw = dict(max_tokens=0, logprobs=1)
    if stream:
        chunks = [c for c in _echo(client, OTHER, stream=True, stream_options={"include_usage": True}, **kw)]
        content = [c.choices[0] for c in chunks if c.choices]
        text = "".join(c.text for c in content)
        lp = content[0].logprobs
        assert [c.finish_reason for c in content][-1] == "length"
        assert all(c.logprobs.tokens == [] for c in content[1:])
        usage = chunks[-1].usage
    else:
        r = _echo(client, OTHER, **kw)
        text, lp, usage = r.choices[0].text, r.choices[0].logprobs, r.usage
        assert r.choices[0].finish_reason == "length"
    assert text == OTHER and len(lp.tokens) == len(ids)
    _check_prompt_part(lp, ids, log_probs, hf_tokenizer, k=1)
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 0)
    # echo without logprobs and max_tokens 0: the prompt back, nothing generated
    r = _echo(client, OTHER, max_tokens=0)
    assert r.choices[0].text == OTHER and r.choices[0].logprobs is None and r.usage.completion_tokens == 0


def test_echo_refusals(server, client):
    with pytest.raises(openai.BadRequestError) as e:     # max_tokens 0 only scores a prompt with echo
        client.completions.create(model=PRIMARY, prompt=OTHER, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:     # best_of > n holds outputs back, without prompt logprobs
        _echo(client, OTHER, max_tokens=2, logprobs=1, n=1, extra_body={"best_of": 2})
    assert e.value.body["param"] == "best_of" and "echo" in e.value.body["message"]
    r = httpx.post(server.base_url + "/completions", headers=server.auth, timeout=30,
                   json={"model": PRIMARY, "prompt": OTHER, "echo": True, "logprobs": 21, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
