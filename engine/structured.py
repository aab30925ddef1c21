"""Constrained decoding with llguidance: a grammar per sequence masks the logits at every step."""
from __future__ import annotations

import json

import torch

from engine.sampling_params import StructuredOutputs


class StructuredOutputError(ValueError):
    """The schema / regex / grammar cannot be compiled; the message says why."""


def grammar_for(spec: StructuredOutputs) -> str:
    """An llguidance grammar (its JSON form) for a structured-output request."""
    from llguidance import LLMatcher
    if spec.json is not None:
        return LLMatcher.grammar_from_json_schema(spec.json)
    if spec.json_object:
        return LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}))
    if spec.regex is not None:
        return LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        alternatives = " | ".join(json.dumps(c) for c in spec.choice)  # Lark string literals
        return LLMatcher.grammar_from_lark(f"start: {alternatives}")
    return LLMatcher.grammar_from_lark(spec.grammar)


def validate(spec: StructuredOutputs) -> None:
    """Raise StructuredOutputError when the constraint does not compile (cheap; no tokenizer)."""
    from llguidance import LLMatcher
    if spec.json is not None:
        try:
            schema = json.loads(spec.json)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise StructuredOutputError("the JSON schema must be an object")
    error = LLMatcher.validate_grammar(grammar_for(spec))
    if error:
        raise StructuredOutputError(error)


def is_available() -> bool:
    try:
        import llguidance  # noqa: F401
        return True
    except ImportError:
        return False


class StructuredBackend:
    """Compiles grammars against the model's tokenizer (built once) and masks logits in batches."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: frozenset[int]):
        from llguidance import LLTokenizer
        self.vocab_size = vocab_size
        # llguidance ends a finished grammar with one eos id; any of the model's eos ids would do.
        self.tokenizer = LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=min(eos_token_ids))
        self._bit = torch.arange(32, dtype=torch.int32)

    def matcher(self, spec: StructuredOutputs):
        from llguidance import LLMatcher
        m = LLMatcher(self.tokenizer, grammar_for(spec))
        if m.is_error():
            raise StructuredOutputError(m.get_error())
        return m

    def apply(self, logits: torch.Tensor, rows: list[int], matchers: list) -> None:
        """Set -inf on the tokens each listed row's grammar forbids next (in place)."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty((len(rows), words), dtype=torch.int32)
        for i, m in enumerate(matchers):
            bitmask[i] = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32)[:words]
        allowed = ((bitmask.unsqueeze(-1) >> self._bit) & 1).view(len(rows), -1)[:, : logits.shape[1]]
        index = torch.tensor(rows, dtype=torch.int64, device=logits.device)
        sub = logits.index_select(0, index)
        sub.masked_fill_(allowed.to(logits.device) == 0, float("-inf"))
        logits.index_copy_(0, index, sub)
