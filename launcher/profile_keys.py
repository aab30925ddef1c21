"""The machinery of profile keys: each key's default, documentation and check live in its dataclass field."""
from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Exclusive pairs: (section name, key, key) — setting both is an error.
Exclusive = tuple[tuple[str, str, str], ...]


def is_repo_id(text: str) -> bool:
    """Whether text has the shape of a hub repo id (org/name)."""
    return bool(_REPO_ID.match(text))


class ProfileError(ValueError):
    """A profile (or a flag overriding it) is invalid; the message is one line naming file and key."""


@dataclass(frozen=True, slots=True)
class Pricing:
    """Prices per 1M tokens, in USD."""
    input: float = 0.0
    output: float = 0.0


def key(default: Any, doc: str, kind: str, *, choices: tuple = (), lo: float | None = None,
        hi: float | None = None, lo_open: bool = False) -> Any:
    """A profile key: its default, its documentation and how its value is checked (kept in metadata)."""
    meta = {"doc": doc, "kind": kind, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}
    return field(default=default, metadata=meta)


def allowed(meta: dict) -> str:
    """What a key accepts, in words (used in errors and in the reference table)."""
    kind, choices, lo, hi = meta["kind"], meta["choices"], meta["lo"], meta["hi"]
    if choices:
        return "one of " + ", ".join(repr(c) if isinstance(c, str) else str(c) for c in choices)
    words = {"bool": "true or false", "str": "a string", "path": "a file path", "source": "a repo id or path",
             "str_list": "a list of strings", "int": "an integer", "float": "a number",
             "int_list": "a list of integers", "int_or_auto": "\"auto\" or an integer",
             "str_or_empty": "a string (may be empty)", "url": "an http(s) URL",
             "pricing": "a table {input = USD, output = USD} per 1M tokens, each >= 0",
             "ray_address": "\"\" (a local Ray), \"auto\" or \"ray://host:port\""}[kind]
    if lo is not None or hi is not None:
        low = "" if lo is None else f"{'>' if meta['lo_open'] else '>='} {lo:g}"
        high = "" if hi is None else f"<= {hi:g}"
        words += " " + " and ".join(p for p in (low, high) if p)
    return words


def check(value: Any, meta: dict, base_dir: Path | None) -> Any:
    """Validate one value against its key's metadata; returns the normalized value or raises ValueError."""
    kind = meta["kind"]

    def number_ok(v: Any, integer: bool) -> bool:
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            return False
        lo, hi = meta["lo"], meta["hi"]
        below = lo is not None and (v <= lo if meta["lo_open"] else v < lo)
        return not below and not (hi is not None and v > hi)

    def price_ok(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0

    ok = {"bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str) and v != "",
          "str_or_empty": lambda v: isinstance(v, str),
          "url": lambda v: isinstance(v, str) and v.startswith(("http://", "https://")),
          "path": lambda v: isinstance(v, str) and v != "",
          "source": lambda v: isinstance(v, str) and v != "",
          "str_list": lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) and s for s in v),
          "int": lambda v: number_ok(v, True),
          "float": lambda v: number_ok(v, False),
          "int_list": lambda v: isinstance(v, (list, tuple)) and all(number_ok(i, True) for i in v),
          "int_or_auto": lambda v: v == "auto" or number_ok(v, True),
          "ray_address": lambda v: isinstance(v, str) and (v in ("", "auto") or v.startswith("ray://")),
          "pricing": lambda v: (isinstance(v, dict) and set(v) <= {"input", "output"}
                                and all(price_ok(x) for x in v.values()))}[kind]
    if not ok(value) or (meta["choices"] and value not in meta["choices"]):
        raise ValueError(f"must be {allowed(meta)}, got {value!r}")
    if kind == "float":
        return float(value)
    if kind in ("str_list", "int_list"):
        return tuple(value)
    if kind == "pricing":
        return Pricing(**{k: float(v) for k, v in value.items()})
    if kind == "url":
        return value.rstrip("/")
    if kind == "path" or (kind == "source" and _looks_like_path(value, base_dir)):
        path = Path(value).expanduser()
        return str(path if path.is_absolute() or base_dir is None else (base_dir / path).resolve())
    return value


def _looks_like_path(value: str, base_dir: Path | None) -> bool:
    """A source is a path if it says so (./, ../, /, ~, .gguf) or names something on disk; else a repo id."""
    if value.startswith(("/", "./", "../", "~")) or value.endswith(".gguf") or not _REPO_ID.match(value):
        return True
    return (base_dir or Path.cwd()).joinpath(value).exists()


def build_section(cls: type, table: dict, where: str, name: str, base_dir: Path | None, current: Any = None,
                  exclusive: Exclusive = (), skip: frozenset[str] = frozenset()) -> Any:
    """A section dataclass from a TOML table: `where` names the file (and table) in errors, `name` the
    section as keys are written (model.source); keys in `skip` belong to the caller (sub-tables)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for k, value in table.items():
        if k in skip:
            continue
        if k not in fields:
            hint = difflib.get_close_matches(k, fields, n=1)
            did = f" (did you mean {name}.{hint[0]}?)" if hint else ""
            raise ProfileError(f"{where}: {name}.{k}: unknown key{did}; allowed keys in [{name}]: "
                               + ", ".join([*fields, *sorted(skip)]))
        try:
            values[k] = check(value, fields[k].metadata, base_dir)
        except ValueError as exc:
            raise ProfileError(f"{where}: {name}.{k}: {exc}") from None
    section = dataclasses.replace(current, **values) if current is not None else cls(**values)
    for sec, a, b in exclusive:
        if sec == name and getattr(section, a) not in (None, ()) and getattr(section, b) not in (None, ()):
            culprit = b if b in table else a
            raise ProfileError(f"{where}: {name}.{culprit}: set either {name}.{a} or {name}.{b}, not both")
    return section


def show_default(default: Any) -> str:
    """A key's default as it would be written in TOML (for the reference table)."""
    if default is None:
        return "(unset)"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, tuple):
        return repr(list(default))
    if isinstance(default, str):
        return f'"{default}"'
    return str(default)
