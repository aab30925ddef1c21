"""Whisper's special tokens and suppression lists, from a model directory's tokenizer.json and configs."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Whisper's languages in token order (<|en|> is the first language token), ISO 639-1 -> English name.
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao",
    "uz": "uzbek", "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk",
    "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan",
    "tl": "tagalog", "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}
# Names clients send for a language (OpenAI takes ISO codes; vLLM also takes names).
LANGUAGE_BY_NAME = {name: code for code, name in LANGUAGES.items()}

SECONDS_PER_TIMESTAMP = 0.02          # <|0.00|>, <|0.02|>, ... <|30.00|>
BLANK_ID = 220                        # " " in Whisper's GPT-2 vocabulary: never a window's first token
MAX_INITIAL_TIMESTAMP_S = 1.0         # the first timestamp of a window is at most this (OpenAI's default)


@dataclass(frozen=True, slots=True)
class WhisperVocab:
    eot: int                              # <|endoftext|>
    sot: int                              # <|startoftranscript|>
    sot_prev: int                         # <|startofprev|>: previous text follows
    no_speech: int                        # <|nospeech|> (<|nocaptions|> in older vocabularies)
    no_timestamps: int                    # <|notimestamps|>; the timestamp tokens follow it
    transcribe: int
    translate: int
    language_ids: dict[str, int]          # ISO code -> <|xx|> token id (empty for an English-only model)
    suppress_ids: tuple[int, ...]         # never sampled
    begin_suppress_ids: tuple[int, ...]   # not sampled as a window's first token (blank, eot)
    vocab_size: int

    @property
    def timestamp_begin(self) -> int:
        return self.no_timestamps + 1

    @property
    def is_multilingual(self) -> bool:
        return bool(self.language_ids)

    def window_prompt(self, previous: list[int], language: str | None, task: str, timestamps: bool,
                      max_previous: int) -> tuple[list[int], int]:
        """A window's decoder prompt: [<|startofprev|> previous...] <|startoftranscript|> [<|lang|> <|task|>]
        [<|notimestamps|>]; language None stops after <|startoftranscript|> (the caller detects it and adds
        `task_tokens`). Returns (ids, index of <|startoftranscript|>)."""
        ids = [self.sot_prev, *previous[-max_previous:]] if previous and max_previous > 0 else []
        sot_index = len(ids)
        ids.append(self.sot)
        if not self.is_multilingual:
            if not timestamps:
                ids.append(self.no_timestamps)
            return ids, sot_index
        if language is not None:
            ids.extend(self.task_tokens(language, task, timestamps))
        return ids, sot_index

    def task_tokens(self, language: str, task: str, timestamps: bool) -> list[int]:
        ids = [self.language_ids[language], self.translate if task == "translate" else self.transcribe]
        return ids + ([] if timestamps else [self.no_timestamps])


def load_whisper_vocab(model_dir: str | Path, vocab_size: int) -> WhisperVocab:
    """Special ids by name from tokenizer.json; suppression lists from generation_config.json (HF layout) or
    config.json (CTranslate2's layout: suppress_ids, suppress_ids_begin)."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    try:
        added = {t["content"]: t["id"] for t in json.loads(path.read_text())["added_tokens"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read Whisper's special tokens ({e})") from None

    def special(*names: str) -> int:
        for name in names:
            if name in added:
                return added[name]
        raise ValueError(f"{path}: no {names[0]} token")

    eot, sot = special("<|endoftext|>"), special("<|startoftranscript|>")
    translate = special("<|translate|>")
    multilingual = vocab_size >= 51865
    codes = list(LANGUAGES)
    language_ids = {code: added[f"<|{code}|>"] for code in codes if f"<|{code}|>" in added} if multilingual else {}
    generation = _read_json(model_dir / "generation_config.json")
    ct2 = _read_json(model_dir / "config.json")
    # config.json is HF's model config (suppress_tokens, ...) or CTranslate2's (suppress_ids, ...)
    suppress = generation.get("suppress_tokens", ct2.get("suppress_tokens", ct2.get("suppress_ids"))) or []
    begin = generation.get("begin_suppress_tokens", ct2.get("begin_suppress_tokens", ct2.get("suppress_ids_begin")))
    if begin is None:
        begin = [BLANK_ID, eot]
    return WhisperVocab(eot=eot, sot=sot, sot_prev=special("<|startofprev|>"),
                        no_speech=special("<|nospeech|>", "<|nocaptions|>"),
                        no_timestamps=special("<|notimestamps|>"), transcribe=special("<|transcribe|>"),
                        translate=translate, language_ids=language_ids,
                        suppress_ids=tuple(int(i) for i in suppress if 0 <= int(i) < vocab_size),
                        begin_suppress_ids=tuple(int(i) for i in begin if 0 <= int(i) < vocab_size),
                        vocab_size=vocab_size)


def _read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}
