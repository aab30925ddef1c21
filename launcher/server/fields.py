"""Typed field readers over a parsed JSON body: every wrong type or range is a 400 naming the field."""
from __future__ import annotations

import math
from typing import Any

import orjson

from launcher.server.errors import bad_request

_MISSING = object()


def parse_json_body(raw: bytes | None) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not raw:
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        # orjson also refuses invalid UTF-8 here, which is what we want.
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(value), type(value).__name__)


class Fields:
    """Reads fields of one JSON object (or a nested one: `prefix` goes in front of names in errors)."""

    def __init__(self, body: dict, prefix: str = ""):
        self.body = body
        self.prefix = prefix
        self.read: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return self.body.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        value = self.body.get(key, _MISSING)
        return default if value is _MISSING or value is None else value

    def fail(self, key: str, expected: str, value: Any = _MISSING) -> None:
        got = "" if value is _MISSING else f", got {_kind(value)}" + (
            f" ({value!r})" if isinstance(value, (int, float, str)) and len(repr(value)) < 60 else "")
        raise bad_request(f"'{self.name(key)}' must be {expected}{got}", self.name(key))

    def bool(self, key: str, default: bool | None = None) -> bool | None:
        value = self.raw(key, default)
        if value is not None and not isinstance(value, bool):
            self.fail(key, "a boolean", value)
        return value

    def int(self, key: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # some clients send 16.0
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, "an integer", value)
        self._range(key, value, lo, hi)
        return value

    def float(self, key: str, default: float | None = None, lo: float | None = None,
              hi: float | None = None) -> float | None:
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, "a finite number", value)
        self._range(key, value, lo, hi)
        return float(value)

    def _range(self, key: str, value: float, lo: float | None, hi: float | None) -> None:
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = (f"between {lo} and {hi}" if lo is not None and hi is not None
                      else f">= {lo}" if lo is not None else f"<= {hi}")
            raise bad_request(f"'{self.name(key)}' must be {bounds}, got {value}", self.name(key))

    def str(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str | None:
        value = self.raw(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            self.fail(key, "a string", value)
        if choices and value not in choices:
            self.fail(key, "one of " + ", ".join(repr(c) for c in choices), value)
        return value

    def dict(self, key: str) -> dict | None:
        value = self.raw(key)
        if value is not None and not isinstance(value, dict):
            self.fail(key, "an object", value)
        return value

    def list(self, key: str) -> list | None:
        value = self.raw(key)
        if value is not None and not isinstance(value, list):
            self.fail(key, "an array", value)
        return value

    def str_or_str_list(self, key: str, max_items: int = 256) -> list[str]:
        value = self.raw(key)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(key, "a string or an array of strings", value)
        if len(value) > max_items:
            raise bad_request(f"'{self.name(key)}' may hold at most {max_items} strings", self.name(key))
        return list(value)

    def int_list(self, key: str, lo: int, hi: int) -> list[int]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            self.fail(key, "an array of integers", value)
        for v in value:
            if not lo <= v <= hi:
                raise bad_request(f"'{self.name(key)}' holds {v}, outside [{lo}, {hi}]", self.name(key))
        return list(value)

    def unread(self) -> list[str]:
        """Keys present in the body that nothing has read (logged, not refused, as vLLM does)."""
        return sorted(k for k in self.body if k not in self.read)
