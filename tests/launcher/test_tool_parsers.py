"""Tool-call parsers on hand-written model outputs: Hermes / Qwen / SmolLM2 blocks, Llama 3 JSON, the constrained
shapes of tool_choice 'required' and named, streaming at every split, and the schemas those choices decode under."""
from __future__ import annotations

import json
import random
import re
from types import SimpleNamespace

import pytest

from launcher.server.errors import APIError
from launcher.server.tool_parsers import (PARSERS, ParsedOutput, detect_tool_parser, make_tool_parser,
                                          tool_choice_constraint, validate_tools)
from launcher.server.tool_parsers.forced import NamedCallParser, RequiredCallsParser
from launcher.server.tool_parsers.hermes import HermesParser
from launcher.server.tool_parsers.llama3_json import Llama3JsonParser

NAMES = ("get_weather", "add", "search")
ID = re.compile(r"^call_[A-Za-z0-9]{24}$")


def calls(parsed: ParsedOutput) -> list[tuple[str, object]]:
    """(name, decoded arguments) of each call: ids are random, argument spacing is the model's."""
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.tool_calls]


def stream(parser, pieces: list[str]) -> list[dict]:
    parser.reset()
    deltas = []
    for piece in pieces:
        deltas += parser.feed(piece)
    return deltas + parser.finish()


def merged(deltas: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    """Check the OpenAI delta rules while merging: per call, the first delta has index, id, type, name and
    arguments ''; later ones only arguments; indexes count up from 0."""
    content, seen = [], {}
    for delta in deltas:
        assert set(delta) in ({"content"}, {"tool_calls"}), delta
        if "content" in delta:
            assert delta["content"], "no empty content deltas"
            content.append(delta["content"])
            continue
        (piece,) = delta["tool_calls"]
        index = piece["index"]
        if index not in seen:
            assert index == len(seen), "calls are numbered in order"
            assert ID.match(piece["id"]) and piece["type"] == "function"
            assert piece["function"]["arguments"] == "" and piece["function"]["name"]
            seen[index] = [piece["function"]["name"], ""]
        else:
            assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
            assert piece["function"]["arguments"]
            seen[index][1] += piece["function"]["arguments"]
    return ("".join(content) or None), [tuple(seen[i]) for i in sorted(seen)]


def as_tuple(parsed: ParsedOutput) -> tuple[str | None, list[tuple[str, str]]]:
    return parsed.content, [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls]


def assert_streaming_matches(parser, text: str) -> None:
    """Every split into two pieces, every character alone, and random splits: the same as parse()."""
    whole = as_tuple(parser.parse(text))
    splits = [[text[:k], text[k:]] for k in range(len(text) + 1)] + [list(text)]
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), 5)))
        splits.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    for pieces in splits:
        assert merged(stream(parser, pieces)) == whole, pieces


HERMES = [
    # (model output, content, calls)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Oslo", "unit": "c"})]),
    ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
     '<tool_call>{"name": "search", "arguments": {"q": "a </b> {[\\"x"}}</tool_call>',
     None, [("add", {"a": 1, "b": 2}), ("search", {"q": 'a </b> {["x'})]),
    ('<tool_call>{"name": "add", "parameters": {"a": 3, "b": 4}}', None, [("add", {"a": 3, "b": 4})]),  # no close
    ('<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"é\\"}"}</tool_call>', None, [("search", {"q": "é"})]),
    ('<tool_call>{"name": "search"}</tool_call> done', " done", [("search", {})]),
    ("No tools needed: 2 < 3 and <tool is fine.", "No tools needed: 2 < 3 and <tool is fine.", []),
    ("", None, []),
]

MALFORMED_HERMES = [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}</tool_call>',     # a brace short
    '<tool_call>{"name": "launch_missiles", "arguments": {}}</tool_call>',               # not offered
    '<tool_call>["get_weather"]</tool_call>',
    '<tool_call>{"arguments": {"city": "Paris"}}</tool_call>',
    '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
    '<tool_call>{"name": "add", "arguments": {"a": NaN}}</tool_call>',
    'Sure <tool_call>{"name": "add", "argum',                                             # cut off
    "trailing <tool_ca",
]


@pytest.mark.parametrize("text, content, expected", HERMES)
def test_hermes(text, content, expected):
    parser = HermesParser(NAMES)
    parsed = parser.parse(text)
    assert parsed.content == content and calls(parsed) == expected
    assert parser.has_tool_calls == bool(expected)
    assert all(ID.match(c["id"]) and c["type"] == "function" for c in parsed.tool_calls)
    assert len({c["id"] for c in parsed.tool_calls}) == len(expected)
    assert_streaming_matches(parser, text)


@pytest.mark.parametrize("text", MALFORMED_HERMES)
def test_hermes_malformed_is_content_unchanged(text):
    parser = HermesParser(NAMES)
    parsed = parser.parse(text)
    assert parsed.tool_calls == [] and parsed.content == text and not parser.has_tool_calls
    assert_streaming_matches(parser, text)


def test_hermes_malformed_block_keeps_the_good_ones():
    bad = '<tool_call>{"name": "add", "arguments": {"a": }}</tool_call>'
    text = f'<tool_call>{{"name": "add", "arguments": {{"a": 1, "b": 1}}}}</tool_call>{bad}'
    parsed = HermesParser(NAMES).parse(text)
    assert calls(parsed) == [("add", {"a": 1, "b": 1})] and parsed.content == bad
    assert_streaming_matches(HermesParser(NAMES), text)


def test_parallel_tool_calls_false_keeps_the_first():
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
            '<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>')
    parser = HermesParser(NAMES, parallel_tool_calls=False)
    assert calls(parser.parse(text)) == [("add", {"a": 1, "b": 2})]
    assert_streaming_matches(parser, text)
    llama = Llama3JsonParser(NAMES, parallel_tool_calls=False)
    assert calls(llama.parse('{"name": "add", "parameters": {"a": 1}}; {"name": "search", "parameters": {}}')) \
        == [("add", {"a": 1})]


LLAMA = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [("add", {"a": 1, "b": 2})]),
    ('  {"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "search", "parameters": {"q": "}{;"}}',
     None, [("add", {"a": 1, "b": 2}), ("search", {"q": "}{;"})]),
    ('{"type": "function", "name": "search", "arguments": {"q": "x"}}\nHere you go.', "\nHere you go.",
     [("search", {"q": "x"})]),
    ('{"name": "search", "parameters": {"q": "say \\"}\\" \\\\"}}', None, [("search", {"q": 'say "}" \\'})]),
    ("The answer is 4.", "The answer is 4.", []),
    ('{"answer": 4}', '{"answer": 4}', []),                                   # JSON, but not a call
    ('{"name": "add", "parameters": {"a": 1', '{"name": "add", "parameters": {"a": 1', []),   # cut off
    ('{"name": "add", "parameters": {"a": 1}}; {"name": "nope", "parameters": {}}',
     '; {"name": "nope", "parameters": {}}', [("add", {"a": 1})]),
    ("<|python_tag|>", "<|python_tag|>", []),
    ("<|python", "<|python", []),
]


@pytest.mark.parametrize("text, content, expected", LLAMA)
def test_llama3_json(text, content, expected):
    parser = Llama3JsonParser(NAMES)
    parsed = parser.parse(text)
    assert parsed.content == content and calls(parsed) == expected
    assert_streaming_matches(parser, text)


REQUIRED = [
    ('[{"name": "add", "parameters": {"a": 1, "b": 2}}]', [("add", {"a": 1, "b": 2})]),
    ('[\n {"name": "search", "parameters": {"q": "}]{[\\" ,:"}},\n'
     ' {"name":"get_weather","parameters":{"city":"Rome","unit":"c"}} ]',
     [("search", {"q": '}]{[" ,:'}), ("get_weather", {"city": "Rome", "unit": "c"})]),
    ('[{"name": "search", "parameters": {}}]', [("search", {})]),
]


@pytest.mark.parametrize("text, expected", REQUIRED)
def test_required_calls(text, expected):
    parser = RequiredCallsParser(NAMES)
    parsed = parser.parse(text)
    assert parsed.content is None and calls(parsed) == expected
    assert_streaming_matches(parser, text)


def test_required_streams_arguments_as_they_come():
    parser = RequiredCallsParser(NAMES)
    text = '[{"name": "search", "parameters": {"q": "long query"}}]'
    deltas = stream(parser, list(text))
    header = next(i for i, d in enumerate(deltas) if "tool_calls" in d)
    fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[header + 1:]]
    assert len(fragments) == len('{"q": "long query"}') and "".join(fragments) == '{"q": "long query"}'


def test_required_cut_off():
    parser = RequiredCallsParser(NAMES)
    parsed = parser.parse('[{"name": "add", "parameters": {"a": 1, "b')   # max_tokens ran out
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls] == [("add", '{"a": 1, "b')]
    assert parser.parse('[{"name": "ad').content == '[{"name": "ad' and not parser.has_tool_calls


def test_named_call():
    parser = NamedCallParser("get_weather")
    text = ' {"city": "Paris", "unit": "f"}'
    parsed = parser.parse(text)
    assert calls(parsed) == [("get_weather", {"city": "Paris", "unit": "f"})] and parsed.content is None
    assert_streaming_matches(parser, text)
    assert calls(parser.parse("")) == [("get_weather", {})]


def request(tool_choice="auto", parallel=True, tools=NAMES) -> SimpleNamespace:
    return SimpleNamespace(tools=[{"type": "function", "function": {"name": n}} for n in tools],
                           tool_choice=tool_choice, parallel_tool_calls=parallel)


QWEN_TEMPLATE = ('{%- if tools %}{{- "<|im_start|>system\\n# Tools\\n<tools>" }}{%- for tool in tools %}'
                 '{{- tool | tojson }}{%- endfor %}{{- "</tools>\\nReturn <tool_call>{\\"name\\": ...}</tool_call>" }}'
                 '{%- endif %}')
LLAMA_TEMPLATE = ('{%- if tools %}{{- "<|start_header_id|>ipython<|end_header_id|>" }}{{- \'{"name": function '
                  'name, "parameters": dictionary of argument name and its value}\' }}{%- endif %}'
                  '{%- if builtin_tools %}{{- "<|python_tag|>" }}{%- endif %}')


def test_parser_chosen_by_template_and_tool_choice(default_gguf_path):
    from engine.loader import ModelFiles, load_tokenizer
    smol = load_tokenizer(ModelFiles.at(default_gguf_path))
    assert detect_tool_parser(smol.chat_template) == "hermes"   # SmolLM2: no markers, the <tool_call> default
    assert detect_tool_parser(QWEN_TEMPLATE) == "hermes"
    assert detect_tool_parser(LLAMA_TEMPLATE) == "llama3_json"
    assert detect_tool_parser(None, frozenset({"<|python_tag|>"})) == "llama3_json"
    assert isinstance(make_tool_parser(smol, request()), HermesParser)
    assert isinstance(make_tool_parser(smol, request(), chat_template=LLAMA_TEMPLATE), Llama3JsonParser)
    assert isinstance(make_tool_parser(smol, request(), tool_parser="llama3_json"), Llama3JsonParser)
    assert make_tool_parser(smol, request("none")) is None
    assert make_tool_parser(smol, request(tools=())) is None
    required = make_tool_parser(smol, request("required", parallel=False))
    assert isinstance(required, RequiredCallsParser) and not required.parallel_tool_calls
    named = make_tool_parser(smol, request({"type": "function", "function": {"name": "add"}}))
    assert isinstance(named, NamedCallParser) and named.name == "add"
    with pytest.raises(ValueError, match="unknown tool parser"):
        make_tool_parser(smol, request(), tool_parser="mistral")
    assert set(PARSERS) == {"hermes", "llama3_json"}


# -- the constraints tool_choice decodes under, checked with llguidance over the real tokenizer -------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "additionalProperties": False,
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "required": ["a", "b"], "properties": {"a": {"$ref": "#/definitions/num"},
                                                             "b": {"$ref": "#/definitions/num"}},
    "definitions": {"num": {"type": "integer"}}}}}
PING = {"type": "function", "function": {"name": "ping"}}


@pytest.fixture(scope="module")
def accepts(default_gguf_path):
    pytest.importorskip("llguidance")
    from engine.loader import ModelFiles, load_tokenizer
    from engine.structured import StructuredBackend
    tok = load_tokenizer(ModelFiles.at(default_gguf_path))
    backend = StructuredBackend(tok.backend.to_str(), tok.vocab_size, frozenset(tok.eos_token_ids))

    def check(spec, text: str) -> bool:
        matcher = backend.matcher(spec)
        ids = tok.encode(text, add_special_tokens=False)
        return matcher.validate_tokens(ids) == len(ids) and matcher.consume_tokens(ids) and matcher.is_accepting()
    return check


def test_required_constraint(accepts):
    tools = [WEATHER, ADD, PING]
    spec = tool_choice_constraint(tools, "required")
    assert accepts(spec, '[{"name": "get_weather", "parameters": {"city": "Paris"}}]')
    assert accepts(spec, '[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "ping", "parameters": {}}]')
    assert not accepts(spec, "[]")                                                       # at least one call
    assert not accepts(spec, 'Sure! [{"name": "ping", "parameters": {}}]')
    assert not accepts(spec, '[{"name": "nope", "parameters": {}}]')                     # only offered tools
    assert not accepts(spec, '[{"name": "add", "parameters": {"a": "x", "b": 2}}]')      # that tool's schema
    assert not accepts(spec, '[{"name": "get_weather", "parameters": {"city": "P", "x": 1}}]')
    single = tool_choice_constraint(tools, "required", parallel_tool_calls=False)
    assert accepts(single, '[{"name": "ping", "parameters": {}}]')
    assert not accepts(single, '[{"name": "ping", "parameters": {}}, {"name": "ping", "parameters": {}}]')


def test_named_constraint(accepts):
    spec = tool_choice_constraint([WEATHER, ADD], {"type": "function", "function": {"name": "add"}})
    assert accepts(spec, '{"a": 1, "b": 2}')
    assert not accepts(spec, '{"a": 1}') and not accepts(spec, '{"city": "Paris"}')
    assert tool_choice_constraint([WEATHER], "auto") is None and tool_choice_constraint([WEATHER], "none") is None


def test_invalid_tool_schemas_are_400():
    pytest.importorskip("llguidance")
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "banana"}}}}}
    with pytest.raises(APIError) as e:
        validate_tools([WEATHER, bad])
    assert e.value.status == 400 and e.value.param == "tools[1].function.parameters"
    dangling = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}}
    with pytest.raises(APIError):
        validate_tools([dangling])
    clash = {"type": "function", "function": {"name": "h", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/num"}}, "$defs": {"num": {"type": "string"}}}}}
    with pytest.raises(APIError) as e:
        tool_choice_constraint([ADD, clash], "required")
    assert e.value.param == "tools"
    # Valid JSON Schema that llguidance cannot enforce is accepted (and skipped), not refused.
    unusual = {"type": "function", "function": {"name": "u", "parameters": {
        "type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True},
                                         "x": {"not": {"type": "string"}}, "d": {"format": "bananas"}}}}}
    validate_tools([WEATHER, ADD, PING, unusual])
    assert tool_choice_constraint([unusual], "required") is not None
