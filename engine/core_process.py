"""The engine core in its own process: a loop over a pipe of the typed messages in engine/messages.py
(engine/engine_process.py is the parent's handle on it).

The process is a fresh interpreter (`python -m engine.core_process`, or the packaged executable with
engine_process.ENGINE_FLAG) that inherits two pipe ends; it never imports its parent's main module, so a user's script
needs no `if __name__ == "__main__":` guard (multiprocessing's spawn would re-run it in the child).
"""
from __future__ import annotations

import gc
import logging
import signal
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Protocol

from engine.config import EngineConfig
from engine.messages import (AbortRequests, AddRequest, EmbedOutput, EmbedRequest, EngineFatal, EngineInfo,
                             EngineStats, FatalStepError, PhaseUpdate, Shutdown, StatsRequest, StepOutputs, StopSample,
                             ToCore, TokenOutput, TranscribeRequest, TranscriptionOutput)

log = logging.getLogger("llm.engine")
IDLE_TRIM_S = 1.0   # idle this long after work: hand the allocator's freed memory back to the OS


class Core(Protocol):
    """What the loop drives: EngineCore (decoders), PoolingCore (encoders and classifiers) and SpeechCore
    (Whisper)."""
    info: EngineInfo

    def add_request(self, request: AddRequest) -> list[TokenOutput]: ...
    def abort(self, request_ids: list[str]) -> list[TokenOutput]: ...
    def stop_sample(self, request_id: str, index: int) -> list[TokenOutput]: ...
    def embed(self, request: EmbedRequest) -> EmbedOutput: ...
    def transcribe(self, request: TranscribeRequest) -> list[TranscriptionOutput]: ...
    def has_work(self) -> bool: ...
    def step(self) -> list[TokenOutput | TranscriptionOutput]: ...
    def fail_all(self, message: str) -> list[TokenOutput | TranscriptionOutput]: ...
    def stats(self) -> EngineStats: ...


def run_engine_core(config: EngineConfig, requests: Connection, outputs: Connection) -> None:
    """Build the core, then serve until told to shut down or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    # NOTE: no cyclic collection while the core builds: importing torch and building the model make ~10^5
    # objects that live as long as the process, and the collections their allocation triggers walk them again
    # and again (~0.2 s of a ~1.2 s start on 2 cores). Then they are frozen: later full collections skip them.
    gc.disable()
    try:
        core = _build_core(config, lambda phase: outputs.send(PhaseUpdate(phase)))
    except Exception as e:  # startup errors are the user's to read: one line, no traceback
        outputs.send(EngineFatal(f"{type(e).__name__}: {e}" if not str(e) else str(e)))
        return
    finally:
        gc.enable()
    gc.freeze()
    _keep_the_heap_while_serving()
    outputs.send(core.info)
    try:
        _serve(core, requests, outputs)
    except (EOFError, BrokenPipeError, OSError):
        pass  # the API process went away: nothing left to serve
    finally:
        close = getattr(core, "close", None)   # EngineCore's tensor-parallel workers
        if close is not None:
            close()


def _build_core(config: EngineConfig, on_phase) -> Core:
    from engine.embedding_core import PoolingCore, is_pooling_model
    if is_pooling_model(config.model):
        _one_rank_only(config)
        return PoolingCore(config, on_phase=on_phase)
    from engine.whisper_loader import is_whisper_model
    if is_whisper_model(config.model):
        _one_rank_only(config)
        from engine.speech_core import SpeechCore
        return SpeechCore(config, on_phase=on_phase)
    from engine.core import EngineCore
    return EngineCore(config, on_phase=on_phase)


def _one_rank_only(config: EngineConfig) -> None:
    if config.tensor_parallel_size > 1:
        raise ValueError(f"{config.model}: tensor_parallel_size > 1 is for text-generation models only")


def _release_freed_memory() -> None:
    """glibc keeps the heap a burst of work freed (prompt-chunk activations, per-step tensors) as the
    process's resident memory; malloc_trim returns it. A no-op where the C library has no malloc_trim."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _keep_the_heap_while_serving() -> None:
    """NOTE: glibc serves blocks over its mmap threshold (128 KB to start, raised only as such blocks are freed)
    with fresh mappings, and gives the heap's free top back once it exceeds its trim threshold: a prompt chunk's
    activations (a few MB a layer) then come back as new pages every step, 1-5k page faults a 128-token prefill at
    2-10 us each in a VM. Heap blocks up to 32 MB, and no trimming while serving, fault once; the idle trim
    (_release_freed_memory) still hands it all back after a pause. A no-op off glibc."""
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)   # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
    mallopt(m_trim_threshold, 1 << 30)


def _serve(core: Core, requests: Connection, outputs: Connection) -> None:
    worked = False
    while True:
        if not core.has_work():   # idle: sleep until a message arrives
            if worked and not requests.poll(IDLE_TRIM_S):   # trimming waits for a real pause, never a request
                _release_freed_memory()
                worked = False
            requests.poll(None)
        immediate: list[TokenOutput | TranscriptionOutput] = []
        while requests.poll(0):
            msg: ToCore = requests.recv()
            if isinstance(msg, Shutdown):
                outputs.send(StepOutputs(immediate + core.abort(list(core.requests)), core.stats()))
                return
            immediate.extend(_handle(core, msg, outputs))
        step_outputs: list[TokenOutput | TranscriptionOutput] = []
        if core.has_work():
            worked = True
            try:
                step_outputs = core.step()
            except FatalStepError as e:   # no further step can run: fail everything, say why, and exit
                log.error("engine stops: %s", e)
                outputs.send(StepOutputs(immediate + core.fail_all(f"engine failed: {e}"), core.stats()))
                outputs.send(EngineFatal(str(e)))
                return
            except Exception as e:  # a bug must not hang clients: fail their requests, keep serving
                log.error("engine step failed:\n%s", traceback.format_exc())
                step_outputs = core.fail_all(f"internal engine error: {type(e).__name__}: {e}")
        if immediate or step_outputs:
            outputs.send(StepOutputs(immediate + step_outputs, core.stats()))


def _handle(core: Core, msg: ToCore, outputs: Connection) -> list[TokenOutput | TranscriptionOutput]:
    """One message between steps; the outputs it produces at once. A message that trips an assertion
    (a client's bug) fails only its own request."""
    try:
        match msg:
            case AddRequest():
                return core.add_request(msg)
            case AbortRequests():
                return core.abort(msg.request_ids)
            case StopSample():
                return core.stop_sample(msg.request_id, msg.index)
            case EmbedRequest():
                outputs.send(core.embed(msg))
            case TranscribeRequest():
                return core.transcribe(msg)
            case StatsRequest():
                outputs.send(core.stats())
            case _:
                raise TypeError(f"not a message for the engine core: {type(msg).__name__}")
    except Exception as e:
        log.error("engine message %s failed:\n%s", type(msg).__name__, traceback.format_exc())
        error = f"internal engine error: {type(e).__name__}: {e}"
        if isinstance(msg, AddRequest):
            core.abort([msg.request_id])
            return [TokenOutput(msg.request_id, i, [], finish_reason="error", error=error)
                    for i in range(msg.params.n)]
        if isinstance(msg, EmbedRequest):
            outputs.send(EmbedOutput(msg.request_id, error=error, error_code="engine_error"))
        if isinstance(msg, TranscribeRequest):
            core.abort([msg.request_id])
            return [TranscriptionOutput(msg.request_id, finished=True, finish_reason="error", error=error)]
    return []


def main(argv: list[str] | None = None) -> None:
    """`python -m engine.core_process REQUESTS_FD OUTPUTS_FD`: the first message is the EngineConfig."""
    argv = sys.argv[1:] if argv is None else argv
    requests = Connection(int(argv[0]), writable=False)
    outputs = Connection(int(argv[1]), readable=False)
    config = requests.recv()
    assert isinstance(config, EngineConfig), type(config)
    run_engine_core(config, requests, outputs)


if __name__ == "__main__":
    main()
