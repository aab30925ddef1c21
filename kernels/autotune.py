"""Per-GPU tuned kernel configs: candidates per kernel, timed once in warm-up, cached as JSON, read by dict lookup."""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernels.user_dir import llm_home

Config = Mapping[str, int]
# progress(done, total, label): called once before the first candidate and after each tuned entry
ProgressFn = Callable[[int, int, str], None]
# timer(fn) -> milliseconds per call of fn (the default is triton.testing.do_bench)
TimerFn = Callable[[Callable[[], Any]], float]

_CACHE_FORMAT = 1


@dataclass(frozen=True, slots=True)
class TuneKey:
    """What a tuned config is valid for; the GPU name and Triton version pick the cache file."""
    kernel: str
    bucket: str      # a coarse shape class, e.g. "d128_g4_b64": nearby shapes share one config
    dtype: str       # "float16", "bfloat16", "float32"

    def as_str(self) -> str:
        return f"{self.kernel}|{self.bucket}|{self.dtype}"


@dataclass(frozen=True, slots=True)
class TuneJob:
    """One entry to tune: its key, the candidates, and a launch of the kernel with a given config."""
    key: TuneKey
    candidates: Sequence[Config]
    launch: Callable[[Config], Any]


# The table the hot path reads: TuneKey -> config. Filled by load/tune during warm-up, before graph capture.
_CHOSEN: dict[TuneKey, dict[str, int]] = {}


def chosen(key: TuneKey, default: Config) -> Config:
    """The tuned config for key, else the kernel's heuristic default. A dict lookup, nothing more."""
    return _CHOSEN.get(key, default)


def clear() -> None:
    """Forget every chosen config (tests; a new model in the same process)."""
    _CHOSEN.clear()


def pow2_bucket(n: int, lo: int = 1, hi: int = 1 << 20) -> int:
    """n rounded up to a power of two within [lo, hi]: the shape classes configs are tuned for."""
    n = max(lo, min(hi, n))
    return 1 << (n - 1).bit_length()


def candidate_errors() -> tuple[type[BaseException], ...]:
    """What a kernel config that cannot run on this GPU raises (Triton's compile and resource errors)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError
    return (OutOfResources, PTXASError, CompilationError)


def lazy(make: Callable[[], Any]) -> Callable[[], Any]:
    """make() on the first call, the same value after: tuning inputs are built only when a job is timed,
    so a warm start (every config from the cache) allocates nothing."""
    box: list = []

    def get():
        if not box:
            box.append(make())
        return box[0]
    return get


def default_cache_dir() -> Path:
    return llm_home() / "autotune"


def cache_file(cache_dir: Path, gpu_name: str, triton_version: str) -> Path:
    """One JSON file per (GPU, Triton version); names are sanitised for any filesystem."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{gpu_name}__triton-{triton_version}")
    return Path(cache_dir) / f"{safe}.json"


def _device_identity() -> tuple[str, str]:
    import torch
    import triton
    return torch.cuda.get_device_name(), triton.__version__


def _default_timer(fn: Callable[[], Any]) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=5, rep=20))


class Autotuner:
    """Loads the cache file, tunes what it lacks (unless skipped), saves, and publishes configs to `chosen`."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, *, skip_tuning: bool = False,
                 progress: ProgressFn | None = None, timer: TimerFn | None = None,
                 gpu_name: str | None = None, triton_version: str | None = None):
        if gpu_name is None or triton_version is None:
            found_gpu, found_triton = _device_identity()
            gpu_name = gpu_name or found_gpu
            triton_version = triton_version or found_triton
        self.path = cache_file(Path(cache_dir) if cache_dir is not None else default_cache_dir(),
                               gpu_name, triton_version)
        self.skip_tuning = skip_tuning
        self.progress = progress
        self.timer = timer or _default_timer
        self.num_tuned = 0       # entries timed by this tuner (0 on a warm start)
        self.num_loaded = 0      # entries found in the cache file

    def _read(self) -> dict[str, dict[str, int]]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}   # a missing or torn file only costs a re-tune
        if data.get("format") != _CACHE_FORMAT:
            return {}
        return {k: {n: int(v) for n, v in c.items()} for k, c in data.get("configs", {}).items()}

    def _write(self, configs: dict[str, dict[str, int]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename so a concurrent reader never sees half a file
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": _CACHE_FORMAT, "configs": configs}, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def run(self, jobs: Sequence[TuneJob]) -> dict[TuneKey, Config]:
        """Resolve every job's config: cache hit, else timed (or the first candidate when skipping)."""
        stored = self._read()
        self.num_loaded = sum(job.key.as_str() in stored for job in jobs)
        todo = [job for job in jobs if job.key.as_str() not in stored]
        if self.progress is not None and todo and not self.skip_tuning:
            self.progress(0, len(todo), "autotune")
        result: dict[TuneKey, Config] = {}
        for job in jobs:
            if job.key.as_str() in stored:
                result[job.key] = stored[job.key.as_str()]
        for done, job in enumerate(todo, start=1):
            if self.skip_tuning:
                # NOTE: heuristic configs are never written, so a later tuned start still tunes them
                result[job.key] = dict(job.candidates[0])
                continue
            best = self._time(job)
            stored[job.key.as_str()] = result[job.key] = best
            self.num_tuned += 1
            if self.progress is not None:
                self.progress(done, len(todo), job.key.as_str())
        if self.num_tuned:
            self._write(stored)
        for key, config in result.items():
            _CHOSEN[key] = dict(config)
        return result

    def _time(self, job: TuneJob) -> dict[str, int]:
        best, best_ms = None, float("inf")
        skippable = candidate_errors()
        for config in job.candidates:
            try:
                ms = self.timer(lambda config=config: job.launch(config))
            except skippable:   # a candidate that does not compile or fit (shared memory, registers)
                # NOTE: nothing broader: an illegal address or a CUDA error is a bug, and it poisons the context
                continue
            if ms < best_ms:
                best, best_ms = dict(config), ms
        if best is None:
            raise RuntimeError(f"no candidate config ran for {job.key.as_str()}")
        return best
