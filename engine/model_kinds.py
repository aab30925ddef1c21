"""What kind of model a directory holds, from its config files alone (no torch: the server asks before an
engine exists): a pooling model (an encoder, a sequence classifier) and its labels, or a Whisper checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Encoders served by the pooling core (engine/models/bert.py).
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
# HF sequence-classifier class -> the backbone kind engine/models/sequence_classification.py builds.
SEQUENCE_CLASSIFIERS = {
    "BertForSequenceClassification": "bert",
    "XLMRobertaForSequenceClassification": "roberta",
    "RobertaForSequenceClassification": "roberta",
    "LlamaForSequenceClassification": "decoder",
    "Qwen2ForSequenceClassification": "decoder",
}


def classifier_architecture(raw: dict[str, Any]) -> str | None:
    return next((a for a in raw.get("architectures") or () if a in SEQUENCE_CLASSIFIERS), None)


def config_labels(raw: dict[str, Any]) -> tuple[str, ...]:
    """id2label in id order; LABEL_i for a config that gives only num_labels (HF's default: 2 labels)."""
    id2label = raw.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return tuple(str(v) for _, v in sorted(id2label.items(), key=lambda kv: int(kv[0])))
    return tuple(f"LABEL_{i}" for i in range(int(raw.get("num_labels", 2))))


def pooling_facts(path: str | Path) -> tuple[bool, tuple[str, ...]]:
    """(is it a pooling model, its classifier labels — empty for an embedding model), from config.json."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False, ()
    try:
        raw = json.loads(config.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return False, ()
    if not isinstance(raw, dict):
        return False, ()
    if classifier_architecture(raw) is not None:
        return True, config_labels(raw)
    return raw.get("model_type") in ENCODER_MODEL_TYPES, ()


def is_pooling_model(path: str | Path) -> bool:
    return pooling_facts(path)[0]


def is_whisper_model(path: str | Path) -> bool:
    """A directory holding a Whisper checkpoint in either layout (cheap: configs and headers only)."""
    path = Path(path)
    if not path.is_dir():
        return False
    from engine.ctranslate2_format import is_ctranslate2_whisper
    if is_ctranslate2_whisper(path):
        return True
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("model_type") == "whisper"
