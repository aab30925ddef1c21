"""The engine core for a speech model (Whisper): the process loop's Core, serving TranscribeRequests.

Each request walks its clip in 30 s windows. A window is encoded once (all windows starting in a step in
one batch) and its cross-attention K/V kept while it decodes; its decoder tokens live in the paged KV cache
like a text sequence's, and every window in flight decodes in the same step (prefill and decode rows mixed,
as the text engine batches them).
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.mel import log_mel_batch
from engine.messages import (AddRequest, EmbedOutput, EmbedRequest, EngineInfo, EngineStats, TokenOutput,
                             TranscribeRequest, TranscriptionOutput, TranscriptionSegment)
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.speech_window import Transcription, Window
from engine.startup import pick_device, pick_dtype
from engine.stats import SchedulerStats
from engine.whisper_decoding import apply_rules, closed_segment, finish_window
from engine.whisper_loader import load_whisper
from engine.whisper_vocab import load_whisper_vocab
from kernels import get_ops

MAX_SPEECH_SEQS = 32          # windows decoding at once (each may hold the whole 448-token context)
MAX_ENCODE_BATCH = 8          # windows encoded in one step (the encoder is the costly part of a window)
SAMPLES_PER_FRAME = 160       # 10 ms mel hop at 16 kHz
FRAMES_PER_WINDOW = 3000      # 30 s


class SpeechCore:
    def __init__(self, config: EngineConfig, on_phase: Callable[[str], None] = lambda phase: None):
        start = time.monotonic()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, self.device)
        on_phase("loading weights")
        self.model = load_whisper(config.model, self.device, dtype, get_ops(self.device.type, config.cpu_kernels))
        mc = self.model.config
        self.vocab = load_whisper_vocab(config.model, mc.vocab_size)
        self.max_context = mc.max_target_positions
        self.max_sampled = self.max_context // 2               # OpenAI's sample_len: half the context
        on_phase("allocating KV cache")
        self.block_size = config.block_size
        self.max_windows = min(config.max_num_seqs, MAX_SPEECH_SEQS)
        blocks_per_window = math.ceil(self.max_context / self.block_size)
        num_blocks = self.max_windows * blocks_per_window
        self.block_manager = BlockManager(num_blocks, self.block_size, enable_prefix_caching=False)
        shape = (num_blocks, self.block_size, mc.decoder_attention_heads, mc.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(mc.decoder_layers)]
        self.requests: dict[str, Transcription] = {}
        self.waiting: deque[Transcription] = deque()          # no window yet (new, or between windows)
        self.windows: list[Window] = []                       # decoding now
        self.num_finished = self.num_prompt_tokens = self.num_generation_tokens = 0
        languages = tuple(self.vocab.language_ids) or ("en",)
        self.info = EngineInfo(
            model_name=config.served_name or config.model, max_model_len=self.max_context, num_blocks=num_blocks,
            block_size=self.block_size, kv_capacity_tokens=num_blocks * self.block_size, device=str(self.device),
            dtype=str(dtype).removeprefix("torch."), eos_token_ids=(self.vocab.eot,), vocab_size=mc.vocab_size,
            is_embedding_model=False, load_seconds=time.monotonic() - start, is_speech_model=True,
            languages=languages, can_translate=self.vocab.is_multilingual)

    # -- messages ---------------------------------------------------------------------------------
    def transcribe(self, request: TranscribeRequest) -> list[TranscriptionOutput]:
        error = self._check(request)
        if error is not None:
            return [TranscriptionOutput(request.request_id, finished=True, finish_reason="error", error=error)]
        audio = np.ascontiguousarray(request.audio, dtype=np.float32)
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.seed)
        language = request.language if self.vocab.is_multilingual else "en"
        job = Transcription(request, audio, len(audio) // SAMPLES_PER_FRAME, language, generator,
                            list(request.prompt_token_ids))
        self.requests[request.request_id] = job
        self.waiting.append(job)
        return []

    def _check(self, request: TranscribeRequest) -> str | None:
        audio = request.audio
        if request.request_id in self.requests:
            return f"request id {request.request_id!r} is already in flight"
        if not isinstance(audio, np.ndarray) or audio.ndim != 1 or len(audio) < SAMPLES_PER_FRAME:
            return "the audio holds no samples (at least 10 ms of 16 kHz mono audio is needed)"
        if request.task not in ("transcribe", "translate"):
            return f"unknown task {request.task!r}: use 'transcribe' or 'translate'"
        if request.task == "translate" and not self.vocab.is_multilingual:
            return "this model is English-only: it cannot translate (use a multilingual Whisper model)"
        if request.language is not None:
            known = self.vocab.language_ids or {"en": None}
            if request.language not in known:
                return (f"language {request.language!r} is not one this model takes"
                        + ("" if self.vocab.is_multilingual else " (an English-only model: 'en')"))
        if any(not 0 <= t < self.vocab.eot for t in request.prompt_token_ids):
            return "the prompt holds ids that are not text tokens"
        if not 0.0 <= request.temperature <= 2.0:
            return f"temperature must be in [0, 2], got {request.temperature}"
        return None

    def add_request(self, request: AddRequest) -> list[TokenOutput]:
        return [TokenOutput(request.request_id, i, [], finish_reason="error",
                            error="a speech model does not complete text prompts; use /v1/audio/transcriptions")
                for i in range(request.params.n)]

    def embed(self, request: EmbedRequest) -> EmbedOutput:
        return EmbedOutput(request.request_id, error="a speech model does not embed text", error_code="not_supported")

    def abort(self, request_ids: list[str]) -> list[TranscriptionOutput]:
        outputs = []
        for request_id in request_ids:
            job = self.requests.get(request_id)
            if job is not None:
                outputs.append(self._finish(job, "abort"))
        return outputs

    def stop_sample(self, request_id: str, index: int) -> list[TokenOutput]:
        return []

    def fail_all(self, message: str) -> list[TranscriptionOutput]:
        return [self._finish(job, "error", message) for job in list(self.requests.values())]

    def has_work(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(SchedulerStats(
            num_running=len(self.windows), num_waiting=len(self.waiting), num_blocks_total=bm.num_blocks,
            num_blocks_used=bm.num_used_blocks, num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens), num_requests_finished=self.num_finished)

    # -- the step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[TranscriptionOutput]:
        outputs: list[TranscriptionOutput] = []
        self._open_windows()
        if not self.windows:
            return outputs
        rows = sorted(self.windows, key=lambda w: w.seq.num_uncomputed_tokens > 1)   # decode rows first
        logits_at, row_lens, ids, positions, slots = [], [], [], [], []
        for w in rows:
            seq, begin = w.seq, w.seq.num_computed_tokens
            new = seq.all_token_ids[begin:]
            base = len(ids)
            ids.extend(new)
            positions.extend(range(begin, seq.num_tokens))
            table, bs = seq.block_table, self.block_size
            slots.extend(table[p // bs] * bs + p % bs for p in range(begin, seq.num_tokens))
            row_lens.append(len(new))
            # logits wanted: the last token's, and <|startoftranscript|>'s when this pass computes it
            sot = base + w.sot_index - begin if begin <= w.sot_index < seq.num_tokens else None
            logits_at.append((base + len(new) - 1, sot))
        num_decode = next((i for i, n in enumerate(row_lens) if n > 1), len(row_lens))
        dec, pre = rows[:num_decode], rows[num_decode:]
        meta = AttentionMetadata.for_batch(
            self.device, slots, [w.seq.block_table for w in dec], [w.seq.num_tokens for w in dec],
            [w.seq.block_table for w in pre], row_lens[num_decode:], [w.seq.num_tokens for w in pre])
        dev = self.device
        hidden = self.model.decode(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev),
                                   self.kv_caches, meta, row_lens, [w.cross for w in rows])
        picks = [i for last, sot in logits_at for i in ((last,) if sot is None else (sot, last))]
        logits = self.model.compute_logits(hidden[torch.tensor(picks, device=dev)]).cpu()
        self.num_prompt_tokens += sum(n for n in row_lens if n > 1)
        k = 0
        for w, n, (last, sot) in zip(rows, row_lens, logits_at):
            w.seq.num_computed_tokens += n
            if sot is not None:
                detected = self._read_start(w, logits[k])
                k += 1
                if detected:             # the prompt ended at <|startoftranscript|>: its task tokens go in next
                    k += 1
                    continue
            row_logits, k = logits[k], k + 1
            outputs.extend(self._sample(w, row_logits))
        return outputs

    def _read_start(self, w: Window, logits: torch.Tensor) -> bool:
        """At <|startoftranscript|>: the no-speech probability, and the language when it is to be detected
        (then the language and task tokens are appended, and True returned)."""
        w.no_speech_prob = float(torch.softmax(logits, dim=-1)[self.vocab.no_speech])
        job = w.job
        if job.language is not None:
            return False
        ids = self.vocab.language_ids
        codes = list(ids)
        job.language = codes[int(torch.argmax(logits[[ids[c] for c in codes]]))]
        for t in self.vocab.task_tokens(job.language, job.request.task, job.request.timestamps):
            w.seq.append_token(t)
        return True

    def _sample(self, w: Window, logits: torch.Tensor) -> list[TranscriptionOutput]:
        job, vocab = w.job, self.vocab
        apply_rules(logits, w.sampled, vocab, job.request.timestamps)
        logprobs = torch.log_softmax(logits, dim=-1)
        temperature = job.request.temperature
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=job.generator))
        else:
            token = int(torch.argmax(logits))
        w.sampled.append(token)
        w.sum_logprob += float(logprobs[token])
        w.seq.append_token(token)
        job.num_tokens += 1
        self.num_generation_tokens += 1
        done = token == vocab.eot or len(w.sampled) >= self.max_sampled or w.seq.num_tokens >= self.max_context
        new_text: list[int] = []
        if not w.held:
            if not job.request.timestamps:
                new_text = [token] if token < vocab.eot else []
            elif (segment := closed_segment(w.sampled, vocab, w.time_offset)) is not None:
                new_text = segment.token_ids
                w.closed.append(segment)
        if done:
            return [self._close_window(w, new_text)]
        return [TranscriptionOutput(job.request.request_id, new_token_ids=new_text, language=job.language,
                                    duration=job.duration, num_tokens=job.num_tokens)] if new_text else []

    def _close_window(self, w: Window, new_text: list[int]) -> TranscriptionOutput:
        """The window's segments (with its final figures), the text not sent yet, and where the next starts."""
        job = w.job
        self.windows.remove(w)
        self.block_manager.deallocate(w.seq)
        rest, advance = finish_window(w.sampled, self.vocab, job.request.timestamps, w.time_offset, w.num_frames,
                                      len(w.closed))
        if w.held:                      # nothing was sent: all of it, unless the window is silence
            kept = [] if w.is_silent else rest
            new_text = [t for p in kept for t in p.token_ids]
            if w.is_silent:
                advance = w.num_frames
        else:
            kept = w.closed + rest
            if job.request.timestamps:   # (without timestamps every text token went out as it came)
                new_text = new_text + [t for p in rest for t in p.token_ids]
        segments = []
        for piece in kept:
            segments.append(TranscriptionSegment(job.num_segments, piece.start, piece.end, piece.token_ids,
                                                 w.avg_logprob, w.no_speech_prob, job.request.temperature))
            job.num_segments += 1
        # NOTE: later windows are not conditioned on earlier text (faster-whisper's
        # condition_on_previous_text=False): on tiny models a window that went wrong (one long segment, a loop)
        # otherwise drags the next ones with it — measured on the 90 s test clip, WER 38% conditioned, 2% not.
        job.previous = []
        job.seek += advance
        done = job.seek >= job.num_frames
        if done:
            del self.requests[job.request.request_id]
            self.num_finished += 1
        else:
            self.waiting.appendleft(job)     # its next window goes before requests not yet started
        return TranscriptionOutput(job.request.request_id, new_token_ids=new_text, segments=segments,
                                   language=job.language, duration=job.duration, finished=done,
                                   finish_reason="stop" if done else None, num_tokens=job.num_tokens)

    def _open_windows(self) -> None:
        """Encode the next windows of waiting requests, as many as there is room for, in one batch."""
        starting: list[Transcription] = []
        while self.waiting and len(self.windows) + len(starting) < self.max_windows \
                and len(starting) < MAX_ENCODE_BATCH:
            starting.append(self.waiting.popleft())
        if not starting:
            return
        chunks = [job.audio[job.seek * SAMPLES_PER_FRAME:(job.seek + FRAMES_PER_WINDOW) * SAMPLES_PER_FRAME]
                  for job in starting]
        mel = log_mel_batch(chunks, self.model.config.num_mel_bins, self.device)
        encoded = self.model.encode(mel.to(self.kv_caches[0][0].dtype))
        for job, states in zip(starting, encoded):
            prompt, sot_index = self.vocab.window_prompt(job.previous, job.language, job.request.task,
                                                         job.request.timestamps, self.max_sampled - 1)
            seq = Sequence(f"{job.request.request_id}#{job.seek}", prompt, SamplingParams(max_tokens=None))
            self.block_manager.allocate(seq, self.max_context)   # a window's whole context, reserved up front
            w = Window(job, seq, self.model.cross_kv(states), sot_index, job.seek / 100,
                       min(FRAMES_PER_WINDOW, job.num_frames - job.seek))
            self.windows.append(w)

    def _finish(self, job: Transcription, reason: str, error: str | None = None) -> TranscriptionOutput:
        for w in [w for w in self.windows if w.job is job]:
            self.windows.remove(w)
            self.block_manager.deallocate(w.seq)
        if job in self.waiting:
            self.waiting.remove(job)
        self.requests.pop(job.request.request_id, None)
        self.num_finished += 1
        return TranscriptionOutput(job.request.request_id, language=job.language, duration=job.duration,
                                   finished=True, finish_reason=reason, num_tokens=job.num_tokens, error=error)
