"""engine.chat_template against transformers' apply_chat_template on real model templates."""
from __future__ import annotations

import copy
import os
from datetime import datetime
from pathlib import Path

import jinja2
import pytest

from engine.chat_template import ChatTemplateError, compile_chat_template, render_chat_template

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
LLAMA31 = (FIXTURES / "llama3.1.jinja").read_text(encoding="utf-8")
QWEN25 = (FIXTURES / "qwen2.5.jinja").read_text(encoding="utf-8")
# The special tokens each real model fills its template with.
SPECIALS = {"llama3.1": ("<|begin_of_text|>", "<|eot_id|>"), "qwen2.5": ("", "<|im_end|>"),
            "smollm2": ("<|im_start|>", "<|im_end|>")}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city (°C) — e.g. Zürich",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                         "parameters": {"type": "object", "properties": {}}}}

USER = [{"role": "user", "content": "Hello! 你好 😀"}]
SYSTEM = [{"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "Hi"}]
MULTI = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and\n3+3?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
TOOL_TURN = [{"role": "user", "content": "Weather in Zürich?"},
             {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21, "sky": "clear"}'}]
TWO_RESULTS = [{"role": "user", "content": "Weather and time?"},
               {"role": "assistant", "content": "Checking.", "tool_calls": [
                   CALL, {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21C"},
               {"role": "tool", "tool_call_id": "call_2", "content": "10:00"},
               {"role": "assistant", "content": "21C at 10:00."}, {"role": "user", "content": "Thanks"}]
CONVERSATIONS = {"user": USER, "system": SYSTEM, "multi": MULTI, "tool_turn": TOOL_TURN}


@pytest.fixture(scope="module")
def hf(default_gguf_path: str):
    """The default model's transformers tokenizer: the reference renderer (templates swapped in per call)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(default_gguf_path),
                                         gguf_file=os.path.basename(default_gguf_path))


def _check(hf, template: str, model: str, messages: list[dict], **kwargs) -> str:
    bos, eos = SPECIALS[model]
    kwargs.setdefault("add_generation_prompt", True)  # ours defaults to True, transformers to False
    before = copy.deepcopy(messages)
    ours = render_chat_template(template, messages, bos_token=bos, eos_token=eos, **kwargs)
    ref = hf.apply_chat_template(messages, chat_template=template, tokenize=False, bos_token=bos,
                                 eos_token=eos, **kwargs)
    assert ours == ref
    assert messages == before  # rendering never mutates the caller's messages
    return ours


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("name", ["user", "system", "multi"])
def test_default_model_template(hf, name: str, gen: bool) -> None:
    assert isinstance(hf.chat_template, str) and "<|im_start|>" in hf.chat_template
    _check(hf, hf.chat_template, "smollm2", CONVERSATIONS[name], add_generation_prompt=gen)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("tools", [None, [WEATHER], [WEATHER, TIME]])
@pytest.mark.parametrize("name", ["user", "system", "multi", "tool_turn"])
def test_llama31_template(hf, name: str, tools: list | None, gen: bool) -> None:
    text = _check(hf, LLAMA31, "llama3.1", CONVERSATIONS[name], tools=tools, add_generation_prompt=gen)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") == gen


@pytest.mark.parametrize("name", ["user", "system", "tool_turn"])
def test_llama31_template_options(hf, name: str) -> None:
    # Tools in the system message instead of the first user message, and a caller-supplied date.
    text = _check(hf, LLAMA31, "llama3.1", CONVERSATIONS[name], tools=[WEATHER], tools_in_user_message=False,
                  date_string="01 Jan 2025")
    assert "Today Date: 01 Jan 2025" in text and '"description": "Current weather in a city (°C) — e.g. Zürich"' in text


def test_llama31_template_raises_its_own_errors(hf) -> None:
    with pytest.raises(ChatTemplateError, match="^This model only supports single tool-calls at once!$"):
        render_chat_template(LLAMA31, TWO_RESULTS, tools=[WEATHER, TIME])
    with pytest.raises(jinja2.TemplateError, match="single tool-calls"):
        hf.apply_chat_template(TWO_RESULTS, chat_template=LLAMA31, tools=[WEATHER, TIME], tokenize=False)
    with pytest.raises(ChatTemplateError, match="no first user message"):
        render_chat_template(LLAMA31, [{"role": "system", "content": "s"}], tools=[WEATHER])


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("tools", [None, [WEATHER, TIME]])
@pytest.mark.parametrize("name", ["user", "system", "multi", "tool_turn", "two_results"])
def test_qwen25_template(hf, name: str, tools: list | None, gen: bool) -> None:
    messages = TWO_RESULTS if name == "two_results" else CONVERSATIONS[name]
    text = _check(hf, QWEN25, "qwen2.5", messages, tools=tools, add_generation_prompt=gen)
    if tools:
        assert '{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a ' \
               'city (°C) — e.g. Zürich"' in text  # tojson keeps key order and non-ASCII text
    if name == "tool_turn":
        assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in text


HELPERS = (
    "{%- set ns = namespace(n=0) -%}"
    "{%- for m in messages -%}{%- if m.role == 'stop' %}{% break %}{% endif -%}"
    "{%- if m.role == 'skip' %}{% continue %}{% endif -%}{%- set ns.n = ns.n + 1 -%}"
    "{% generation %}[{{ m.role }}|{{ m.content }}|{{ m.reasoning_content }}|{{ m.thinking }}]{% endgeneration %}"
    "{%- endfor -%}\n"
    "  {% if tools %}{{ tools | tojson(indent=2) }}{{ tools | tojson(separators=(',', ':'), sort_keys=true) }}"
    "{% endif %}\n"
    "{{ ns.n }} {{ bos_token }}{{ eos_token }} {{ strftime_now('%Y') }} {{ custom_flag }} "
    "{{ documents | tojson if documents else 'nodocs' }}{{ add_generation_prompt }}"
)


def test_jinja_environment_matches_transformers(hf) -> None:
    """loopcontrols, namespace, generation tags, tojson options, strftime_now, reasoning aliases, extra kwargs."""
    messages = [{"role": "user", "content": "q"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "a", "reasoning": "because"}, {"role": "stop", "content": "s"},
                {"role": "user", "content": "never"}]
    docs = [{"title": "T", "text": "ü"}]
    for kwargs in ({}, {"tools": [WEATHER], "documents": docs, "custom_flag": True, "add_generation_prompt": False}):
        text = _check(hf, HELPERS, "smollm2", messages, **kwargs)
        assert f" {datetime.now().year} " in text
    assert "[assistant|a|because|because]" in text and "never" not in text


def test_sandbox_and_errors() -> None:
    for bad in ("{{ ''.__class__.__mro__ }}", "{% set _ = messages.append(1) %}", "{% set ns = namespace(_x=1) %}"):
        with pytest.raises(ChatTemplateError):
            render_chat_template(bad, USER)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", USER)
    with pytest.raises(ChatTemplateError, match="^custom message$"):
        render_chat_template("{{ raise_exception('custom message') }}", USER)
    with pytest.raises(TypeError):
        render_chat_template(QWEN25, ["not a dict"])


def test_templates_compile_once() -> None:
    assert compile_chat_template(QWEN25) is compile_chat_template(QWEN25)
    assert compile_chat_template(QWEN25) is not compile_chat_template(LLAMA31)
