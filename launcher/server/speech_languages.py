"""Whisper's languages: ISO 639-1 code -> the lower-case English name OpenAI's verbose_json reports."""
from __future__ import annotations

from engine.whisper_vocab import LANGUAGE_BY_NAME as _CODE_OF_NAME
from engine.whisper_vocab import LANGUAGES as LANGUAGE_NAMES   # one table: the engine's, in token order


def language_code(value: str) -> str | None:
    """The ISO code a client means: a code ('en') or an English name ('English'), as Whisper takes both."""
    value = value.strip().lower()
    return value if value in LANGUAGE_NAMES else _CODE_OF_NAME.get(value)


def language_name(code: str | None) -> str:
    """What verbose_json says for a code ('english'); an unknown code is reported as it is."""
    return LANGUAGE_NAMES.get(code or "", code or "")
