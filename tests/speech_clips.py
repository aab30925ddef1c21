"""Speech made here with espeak-ng (Debian's espeak-ng package; .ci/run installs it), and word error rate."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

# Ten sentences of everyday English, no digits (a number's spelling would make the WER ambiguous).
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please send the report to the team before Friday afternoon.",
    "It was raining heavily when we arrived at the station.",
    "She opened the window and looked at the quiet garden.",
    "Our meeting starts early tomorrow morning in the main office.",
    "The children played football in the park after school.",
    "Could you tell me where the nearest pharmacy is?",
    "He bought fresh bread, cheese and apples at the market.",
    "The museum closes at noon on public holidays.",
    "We should check the engine before the long journey home.",
]


def espeak_binary() -> str:
    """espeak-ng's path; without it the tests that need speech skip, except where LLM_TESTS_REQUIRE_ESPEAK=1
    (.ci/run installs it and sets that, so CI never skips them silently)."""
    path = shutil.which("espeak-ng")
    if path is None:
        if os.environ.get("LLM_TESTS_REQUIRE_ESPEAK") == "1":
            raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    return path


def speak(text: str, path: Path, voice: str = "en-us", words_per_minute: int = 130) -> Path:
    """A WAV (22.05 kHz mono, espeak's own rate) of text spoken by espeak-ng; 130 words a minute: tiny.en
    misheard 12% of the words at that pace against 14-15% at 150-175 (measured over SENTENCES)."""
    subprocess.run([espeak_binary(), "-v", voice, "-s", str(words_per_minute), "-w", str(path), text],
                   check=True, capture_output=True)
    return path


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower().replace("-", " "))


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """(substitutions + deletions + insertions) / reference words, over the whole set."""
    errors = total = 0
    for ref, hyp in zip(references, hypotheses, strict=True):
        r, h = _words(ref), _words(hyp)
        row = list(range(len(h) + 1))   # edit distance, one row at a time
        for i, rw in enumerate(r, 1):
            prev, row[0] = row[0], i
            for j, hw in enumerate(h, 1):
                prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
        errors += row[len(h)]
        total += len(r)
    return errors / max(1, total)
