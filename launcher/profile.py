"""TOML serving profiles -> frozen dataclasses; unknown keys and bad values are errors naming file and key."""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS
from engine.weights import DEFAULT_MODEL
from launcher.profile_keys import (Exclusive, Pricing, ProfileError, allowed, build_section, is_repo_id, key,
                                   show_default)
from launcher.providers import ALIASES, PROVIDERS

ENGINES = (*PROVIDERS, *ALIASES)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["DefaultsSection", "DistributedSection", "EngineSection", "KernelsSection", "ModelEntry", "ModelSection",
           "Pricing", "Profile", "ProfileError", "ServerSection", "UpstreamSection", "apply_overrides", "default_profile", "engine_kwargs",
           "is_repo_id", "load_profile", "parse_profile", "profile_reference", "reference_markdown", "tomllib"]


@dataclass(frozen=True, slots=True)
class ModelSection:
    """[model]: what to serve and under which names."""
    source: str = key(DEFAULT_MODEL, "HF repo id (org/name), local HF directory, or .gguf file", "source")
    served_names: tuple[str, ...] = key((), "names clients may use in `model`; empty: the source", "str_list")
    dtype: str = key("auto", "weight/activation dtype; auto: bfloat16 on CUDA, float32 on CPU", "str",
                      choices=("auto", "float32", "float16", "bfloat16"))
    max_model_len: int | str | None = key(None, "context window in tokens; unset: the model's (startup "
                                           "fails if the KV cache cannot hold it); auto: the largest that "
                                           "fits, up to the model's", "int_or_auto", lo=1)
    revision: str | None = key(None, "hub revision (branch, tag or commit) when source is a repo id", "str")
    chat_template: str | None = key(None, "Jinja chat template file overriding the model's", "path")
    tokenizer: str | None = key(None, "tokenizer repo id or directory, if not the model's own", "source")
    offline: bool = key(False, "never contact a model hub; a missing model is an error. Default: true "
                        "when LLM_OFFLINE=1 is set", "bool")
    enabled: bool = key(True, "serve this model; [model] enabled = false serves none from [model] (only "
                        "[[models]] and [[upstreams]])", "bool")
    load: str = key("at_start", "at_start: loaded before the server is ready; on_demand: loaded by its first "
                    "request, unloaded after keep_alive_s idle", "str", choices=("at_start", "on_demand"))
    keep_alive_s: float = key(300.0, "on_demand: how long an idle model stays loaded", "float", lo=0.0,
                              lo_open=True)
    pricing: Pricing | None = key(None, "what /api/models shows as this model's price; unset: 0", "pricing")

    @property
    def names(self) -> tuple[str, ...]:
        """The served names, the source (for repo ids) or the file/folder name when none are set."""
        if self.served_names:
            return self.served_names
        return (self.source,) if is_repo_id(self.source) else (Path(self.source).name,)


@dataclass(frozen=True, slots=True)
class EngineSection:
    """[engine]: device, batching and KV cache."""
    device: str = key("auto", "auto: cuda when a GPU is present, else cpu", "str",
                       choices=("auto", "cuda", "cpu"))
    max_num_seqs: int = key(DEFAULT_MAX_NUM_SEQS, "most sequences in one batch", "int", lo=1)
    max_num_batched_tokens: int = key(DEFAULT_MAX_NUM_BATCHED_TOKENS,
                                       "most tokens (prefill chunks + decodes) in one step", "int", lo=1)
    block_size: int = key(DEFAULT_BLOCK_SIZE, "tokens per KV cache block", "int", choices=(8, 16, 32, 64, 128))
    kv_cache_memory_fraction: float | None = key(
        None, "on CUDA, the share of GPU memory for weights + KV cache (vLLM's gpu_memory_utilization); "
        "unset: 0.9; exclusive with kv_cache_gib", "float",
        lo=0.0, hi=1.0, lo_open=True)
    kv_cache_gib: float | None = key(None, "KV cache size in GiB (unset on CPU: 2); exclusive with "
                                      "kv_cache_memory_fraction",
                                      "float", lo=0.0, lo_open=True)
    kv_cache_dtype: str = key("auto", "K/V cache element type; auto: the model dtype, but float16 on CPU "
                              "where the int8-activation kernels run (half the memory a token, as "
                              "llama.cpp's f16 cache); one other than the model dtype is CPU-only", "str",
                              choices=("auto", "float32", "float16", "bfloat16"))
    enable_prefix_caching: bool = key(True, "reuse KV blocks of shared prompt prefixes", "bool")
    cuda_graphs: bool = key(True, "capture decode steps as CUDA graphs (ignored on CPU)", "bool")
    cuda_graph_sizes: tuple[int, ...] = key((), "batch sizes to capture; empty: 1, 2, 4, 8 then steps of "
                                             "8 up to max_num_seqs", "int_list", lo=1)
    seed: int = key(0, "seed for requests that set none", "int", lo=0)
    limit_images_per_prompt: int = key(8, "vision models: the most images one prompt may hold; more is a 400",
                                       "int", lo=1)


@dataclass(frozen=True, slots=True)
class KernelsSection:
    """[kernels]: Triton kernel tuning on the GPU, the quantized-weight kernel on the CPU."""
    autotune: bool = key(True, "tune kernel configs for this GPU at startup (cached)", "bool")
    cache_dir: str | None = key(None, "where tuned configs are kept; unset: $LLM_HOME/autotune", "path")
    cpu_kernels: bool = key(True, "on CPU, C kernels compiled once with the system's cc: GGUF "
                             "Q4_x/Q5_x/Q6_K/Q8_0 weights multiplied in packed form (batches up to 64 "
                             "rows), paged decode attention, RMSNorm, rotary, SiLU-mul; false: torch ops, "
                             "float32 weights",
                             "bool")
    cpu_float_copies: bool = key(False, "on CPU, keep float32 copies of the packed weights for prompt "
                                  "chunks over 64 tokens (prefill ~15-30% faster, ~5x the packed size in "
                                  "memory); false: every batch runs the packed kernels", "bool")
    cpu_weight_cache: bool = key(True, "on CPU, keep the packed GGUF weights in $LLM_HOME/packed after the "
                                 "first start and map them on the next (no dequantize and repack)", "bool")
    cpu_quantized_activations: bool = key(True, "on CPU, quantize activations to int8 per weight group for "
                                          "the packed-weight products (integer dot products, as llama.cpp "
                                          "does): faster decode and prompts; false: float32 "
                                          "activations, the same numbers as HF transformers on the "
                                          "dequantized weights", "bool")


@dataclass(frozen=True, slots=True)
class DistributedSection:
    """[distributed]: past one device: tensor parallel (engine/tp_worker.py), replicas on Ray Serve
    (launcher/ray_serve.py)."""
    tensor_parallel_size: int = key(1, "ranks each layer is split over (attention heads, MLP); must divide the "
                                    "model's attention heads (an error names the sizes that work); 1: one "
                                    "process. On CUDA one GPU per rank", "int", lo=1)
    backend: str = key("auto", "torch.distributed backend; auto: nccl on CUDA, gloo on CPU", "str",
                       choices=("auto", "nccl", "gloo"))
    replicas: int | str = key(1, "servers behind one address on Ray Serve (launcher/ray_serve.py), each with "
                              "its own engine; 1: no Ray; auto: Serve scales between min_replicas and "
                              "max_replicas", "int_or_auto", lo=1)
    min_replicas: int = key(1, "replicas = auto: the fewest kept running", "int", lo=1)
    max_replicas: int = key(4, "replicas = auto: the most started", "int", lo=1)
    target_ongoing_requests: float = key(2.0, "replicas = auto: requests in flight per replica Serve scales "
                                         "towards", "float", lo=0.0, lo_open=True)
    ray_address: str = key("", "the Ray cluster for replicas; empty: start a local one (stopped with the "
                           "server); auto or ray://host:port: join a running cluster", "ray_address")

    @property
    def uses_ray(self) -> bool:
        """Whether `llm serve` runs on Ray Serve (more than one replica, or autoscaled)."""
        return self.replicas == "auto" or self.replicas > 1


@dataclass(frozen=True, slots=True)
class ServerSection:
    """[server]: the HTTP side."""
    host: str = key("127.0.0.1", "address to bind; 0.0.0.0 for all interfaces", "str")
    port: int = key(8000, "TCP port; 0 picks a free one", "int", lo=0, hi=65535)
    api_keys: tuple[str, ...] = key((), "accepted Bearer keys on /v1/*; empty (and no api_key_env): no auth",
                                     "str_list")
    api_key_env: str | None = key(None, "name of an env var holding the keys (comma-separated); "
                                   "exclusive with api_keys", "str")
    cors_origins: tuple[str, ...] = key((), "origins allowed by CORS ('*' for any); empty: CORS off",
                                         "str_list")
    max_request_body_bytes: int = key(16 * 1024 * 1024, "larger request bodies get 413", "int", lo=1024)
    max_queued_requests: int = key(1024, "requests waiting beyond this get 503", "int", lo=1)
    request_timeout_s: float = key(600.0, "a request running longer is aborted", "float", lo=0.0, lo_open=True)
    log_requests: bool = key(False, "log one line per request", "bool")
    max_loaded_models: int | None = key(None, "most models loaded at once: loading an on_demand one past "
                                        "this unloads the least recently used idle one; unset: no limit",
                                        "int", lo=1)
    max_stored_responses: int = key(1000, "/v1/responses kept for previous_response_id and GET (store: true); "
                                    "the least recently used go past this", "int", lo=1)
    persist_responses: bool = key(False, "also keep stored responses as JSON files in $LLM_HOME/responses, so they "
                                  "outlive a restart", "bool")
    max_audio_s: float = key(600.0, "longest audio clip a speech model is given (a /v1/audio/* upload, one "
                             "/v1/realtime commit); longer is a 400. 600 s keeps one clip at 38 MB of 16 kHz "
                             "float32 samples and 20 Whisper windows", "float", lo=0.0, lo_open=True)
    allowed_media_dirs: tuple[str, ...] = key((), "folders whose images a request may name as file:// URLs "
                                              "(symlinks resolved first); empty: no file:// URLs", "str_list")
    max_image_bytes: int = key(20 * 1024 * 1024, "largest image a request may send or name (a data: URL, a file, "
                               "an http download); larger is a 400", "int", lo=1024)
    max_image_pixels: int = key(32 * 1024 * 1024, "images with more pixels are refused before decoding (a "
                                "small PNG can claim a huge canvas)", "int", lo=1)
    media_fetch_timeout_s: float = key(10.0, "time limit for downloading one http(s) image URL", "float",
                                       lo=0.0, lo_open=True)

    def resolve_api_keys(self, environ: dict[str, str] | None = None) -> tuple[str, ...]:
        """The keys to accept: api_keys, or those in $api_key_env (an unset variable is an error)."""
        if self.api_key_env is None:
            return self.api_keys
        env = os.environ if environ is None else environ
        keys = tuple(k.strip() for k in env.get(self.api_key_env, "").split(",") if k.strip())
        if not keys:
            raise ProfileError(f"server.api_key_env: environment variable {self.api_key_env} is unset or empty")
        return keys


@dataclass(frozen=True, slots=True)
class DefaultsSection:
    """[defaults]: sampling defaults for requests that omit them (unset: the model's generation_config.json,
    then OpenAI's defaults)."""
    temperature: float | None = key(None, "sampling temperature; 0 is greedy", "float", lo=0.0)
    top_p: float | None = key(None, "nucleus sampling mass", "float", lo=0.0, hi=1.0, lo_open=True)
    top_k: int | None = key(None, "sample from the k most likely tokens; 0 or -1: off", "int", lo=-1)
    min_p: float | None = key(None, "drop tokens below min_p x the top probability", "float", lo=0.0, hi=1.0)
    repetition_penalty: float | None = key(None, "HF-style penalty on seen tokens; 1: off", "float",
                                            lo=0.0, lo_open=True)
    presence_penalty: float | None = key(None, "OpenAI presence penalty", "float", lo=-2.0, hi=2.0)
    frequency_penalty: float | None = key(None, "OpenAI frequency penalty", "float", lo=-2.0, hi=2.0)
    max_tokens: int | None = key(None, "completion length when a request sets none; unset: up to "
                                  "max_model_len", "int", lo=1)
    use_generation_config: bool = key(True, "take defaults from the model's generation_config.json for "
                                       "keys not set here", "bool")

    def sampling_overrides(self) -> dict[str, float | int]:
        """The sampling keys this profile sets, as SamplingParams keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "use_generation_config" and getattr(self, f.name) is not None}


@dataclass(frozen=True, slots=True)
class UpstreamSection:
    """[[upstreams]]: an OpenAI-compatible server (or a provider's API) whose models are served through this one."""
    name: str = key("", "shown as the models' owned_by / provider; required", "str")
    engine: str = key("openai", "the provider kind: openai, nim, vllm, trt_llm, anthropic, azure, cohere or "
                      "custom (any OpenAI-compatible server)", "str", choices=tuple(ENGINES))
    base_url: str | None = key(None, "the API's base URL (http://host:port/v1); unset: the provider's own "
                               "(openai, anthropic, cohere; azure: $AZURE_OPENAI_ENDPOINT)", "url")
    api_key_env: str | None = key(None, "env var with the key sent upstream; unset: the provider's usual "
                                  "one (OPENAI_API_KEY, ANTHROPIC_API_KEY, AZURE_OPENAI_API_KEY, ...)", "str")
    models: tuple[str, ...] = key(("*",), "the upstream's model ids to serve; [\"*\"]: all it lists",
                                  "str_list")
    prefix: str = key("", "prepended to the upstream's ids (\"lab/\" serves gpt-4o as lab/gpt-4o)",
                      "str_or_empty")
    timeout_s: float = key(60.0, "a request (or a listing) to the upstream taking longer fails with 504",
                           "float", lo=0.0, lo_open=True)
    refresh_s: float = key(300.0, "how long a models = [\"*\"] listing is cached", "float", lo=0.0)
    forward_authorization: bool = key(True, "send the caller's Authorization header upstream (only while "
                                      "this server has no api_keys of its own)", "bool")
    api_version: str | None = key(None, "azure: the api-version query parameter; unset: 2024-06-01", "str")


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One local model: [model] with [engine], or a [[models]] table with its [models.engine] overrides."""
    model: ModelSection
    engine: EngineSection
    table: str            # where it was written, for errors: "[model]" or "[[models]] #2"
    # its tensor_parallel_size and backend ([distributed], or [models.distributed] over it); the replica keys
    # are the server's, read from [distributed] alone
    distributed: DistributedSection = field(default_factory=DistributedSection)


@dataclass(frozen=True, slots=True)
class Profile:
    """A whole serving profile; `path` is the file it came from (None for the built-in default)."""
    model: ModelSection = field(default_factory=ModelSection)
    engine: EngineSection = field(default_factory=EngineSection)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    server: ServerSection = field(default_factory=ServerSection)
    defaults: DefaultsSection = field(default_factory=DefaultsSection)
    models: tuple[ModelEntry, ...] = ()             # [[models]]
    upstreams: tuple[UpstreamSection, ...] = ()     # [[upstreams]]
    description: str = ""
    path: str | None = None

    @property
    def local_models(self) -> list[ModelEntry]:
        """Every enabled local model, [model] first."""
        first = [ModelEntry(self.model, self.engine, "[model]", self.distributed)] if self.model.enabled else []
        return first + [m for m in self.models if m.model.enabled]


SECTIONS: dict[str, type] = {"model": ModelSection, "engine": EngineSection, "kernels": KernelsSection,
                             "distributed": DistributedSection, "server": ServerSection,
                             "defaults": DefaultsSection}
TABLE_ARRAYS = ("models", "upstreams")
EXCLUSIVE: Exclusive = (("engine", "kv_cache_memory_fraction", "kv_cache_gib"),
                        ("server", "api_keys", "api_key_env"))
FLAG_KEYS = {"host": "server.host", "port": "server.port", "api_key": "server.api_keys",
             "device": "engine.device", "model": "model.source", "max_model_len": "model.max_model_len",
             "offline": "model.offline", "served_name": "model.served_names", "dtype": "model.dtype",
             "max_num_seqs": "engine.max_num_seqs", "block_size": "engine.block_size",
             "kv_cache_gib": "engine.kv_cache_gib", "cuda_graphs": "engine.cuda_graphs",
             "autotune": "kernels.autotune", "chat_template": "model.chat_template"}


def engine_kwargs(profile: Profile, entry: ModelEntry | None = None) -> dict[str, Any]:
    """Keyword arguments for engine.config.EngineConfig (all but the resolved model path) of one local model
    (default: [model]); unset keys are left out so the engine's own defaults apply."""
    e, m, d = (entry.engine, entry.model, entry.distributed) if entry is not None else \
        (profile.engine, profile.model, profile.distributed)
    kwargs = {"served_name": m.names[0], "dtype": m.dtype, "device": e.device, "max_model_len": m.max_model_len,
              "block_size": e.block_size, "kv_cache_gib": e.kv_cache_gib, "kv_cache_dtype": e.kv_cache_dtype,
              "kv_cache_memory_fraction": e.kv_cache_memory_fraction, "max_num_seqs": e.max_num_seqs,
              "max_num_batched_tokens": e.max_num_batched_tokens,
              "enable_prefix_caching": e.enable_prefix_caching, "seed": e.seed,
              "cuda_graphs": e.cuda_graphs, "cuda_graph_sizes": e.cuda_graph_sizes,
              "autotune": profile.kernels.autotune, "autotune_cache_dir": profile.kernels.cache_dir,
              "cpu_kernels": profile.kernels.cpu_kernels,
              "cpu_float_copies": profile.kernels.cpu_float_copies,
              "cpu_quantized_activations": profile.kernels.cpu_quantized_activations,
              "cpu_weight_cache": profile.kernels.cpu_weight_cache,
              "tensor_parallel_size": d.tensor_parallel_size, "distributed_backend": d.backend,
              "limit_images_per_prompt": e.limit_images_per_prompt}
    return {k: v for k, v in kwargs.items() if v is not None}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def default_profile() -> Profile:
    """The built-in profile: the default model on whatever device is present."""
    return Profile(model=ModelSection(offline=_env_flag("LLM_OFFLINE")))


def parse_profile(data: dict, where: str, base_dir: Path | None = None) -> Profile:
    """Build a Profile from a parsed TOML table; `where` names the source in errors."""
    sections = {}
    for name, table in data.items():
        if name == "description":
            if not isinstance(table, str):
                raise ProfileError(f"{where}: description: must be a string, got {table!r}")
            continue
        if name in TABLE_ARRAYS:
            if not isinstance(table, list) or not all(isinstance(t, dict) for t in table):
                raise ProfileError(f"{where}: {name}: must be an array of tables ([[{name}]]), got {table!r}")
            continue
        if name not in SECTIONS:
            raise ProfileError(f"{where}: [{name}]: unknown section; allowed: description, "
                               + ", ".join(f"[{s}]" for s in SECTIONS) + ", "
                               + ", ".join(f"[[{s}]]" for s in TABLE_ARRAYS))
        if not isinstance(table, dict):
            raise ProfileError(f"{where}: {name}: must be a table ([{name}]), got {table!r}")
        sections[name] = table
    offline = _env_flag("LLM_OFFLINE")
    model_table = {"offline": offline, **sections.get("model", {})}
    built = {name: build_section(cls, model_table if name == "model" else sections.get(name, {}),
                                 where, name, base_dir, exclusive=EXCLUSIVE) for name, cls in SECTIONS.items()}
    models = tuple(_model_entry(t, f"{where}: [[models]] #{i + 1}", f"[[models]] #{i + 1}", built["engine"],
                                built["distributed"], base_dir, offline) for i, t in enumerate(data.get("models", [])))
    upstreams = tuple(_upstream(t, f"{where}: [[upstreams]] #{i + 1}", base_dir)
                      for i, t in enumerate(data.get("upstreams", [])))
    profile = Profile(**built, models=models, upstreams=upstreams, description=data.get("description", ""))
    _check_names(profile, where)
    _check_replicas(profile.distributed, where)
    return profile


def _check_replicas(d: DistributedSection, where: str) -> None:
    if d.min_replicas > d.max_replicas:
        raise ProfileError(f"{where}: distributed.min_replicas: {d.min_replicas} is more than "
                           f"distributed.max_replicas ({d.max_replicas})")


def _model_entry(table: dict, where: str, label: str, engine: EngineSection, distributed: DistributedSection,
                 base_dir: Path | None, offline: bool) -> ModelEntry:
    if "source" not in table:
        raise ProfileError(f"{where}: models.source: required (a repo id, HF directory or .gguf file)")
    overrides, spread = table.get("engine", {}), table.get("distributed", {})
    for key, sub_table in (("engine", overrides), ("distributed", spread)):
        if not isinstance(sub_table, dict):
            raise ProfileError(f"{where}: models.{key}: must be a table ([models.{key}]), got {sub_table!r}")
    server_wide = sorted(set(spread) - set(_PER_MODEL_DISTRIBUTED))
    if server_wide:
        raise ProfileError(f"{where}: models.distributed.{server_wide[0]}: set it in [distributed] (replicas hold "
                           f"every model); [models.distributed] takes {', '.join(_PER_MODEL_DISTRIBUTED)}")
    model = build_section(ModelSection, {"offline": offline, **table}, where, "models", base_dir,
                          skip=frozenset({"engine", "distributed"}))
    engine = build_section(EngineSection, overrides, where, "models.engine", base_dir, current=engine,
                           exclusive=(("models.engine", "kv_cache_memory_fraction", "kv_cache_gib"),))
    distributed = build_section(DistributedSection, spread, where, "models.distributed", base_dir, current=distributed)
    return ModelEntry(model, engine, label, distributed)


# The [distributed] keys a [[models]] table may set for itself: how its own engine spreads over devices.
_PER_MODEL_DISTRIBUTED = ("tensor_parallel_size", "backend")


def _upstream(table: dict, where: str, base_dir: Path | None) -> UpstreamSection:
    if not table.get("name"):
        raise ProfileError(f"{where}: upstreams.name: required (shown as the models' provider)")
    section = build_section(UpstreamSection, table, where, "upstreams", base_dir)
    info = PROVIDERS.get(ALIASES.get(section.engine, section.engine))
    if section.base_url is None and info.default_base_url is None and info.engine != "azure":
        raise ProfileError(f"{where}: upstreams.base_url: required for engine {section.engine!r}")
    if section.models != ("*",) and "*" in section.models:
        raise ProfileError(f"{where}: upstreams.models: [\"*\"] (everything listed) or explicit ids, not both")
    return section


def _check_names(profile: Profile, where: str) -> None:
    """A served name belongs to one model; an upstream name to one upstream."""
    owner: dict[str, str] = {}

    def claim(name: str, table: str) -> None:
        if name in owner and owner[name] != table:
            raise ProfileError(f"{where}: served name {name!r} is claimed by both {owner[name]} and {table}")
        owner[name] = table

    for entry in profile.local_models:
        for name in entry.model.names:
            claim(name, entry.table)
    seen: dict[str, int] = {}
    for i, up in enumerate(profile.upstreams):
        table = f"[[upstreams]] #{i + 1}"
        if up.name in seen:
            raise ProfileError(f"{where}: upstream name {up.name!r} is used by both [[upstreams]] "
                               f"#{seen[up.name] + 1} and {table}")
        seen[up.name] = i
        for model_id in up.models:
            if model_id != "*":
                claim(up.prefix + model_id, table)


def load_profile(path: str | os.PathLike) -> Profile:
    """Read a TOML profile; relative paths inside it resolve against its folder."""
    file = Path(path).expanduser()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"{file}: profile not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{file}: cannot read profile: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{file}: invalid TOML: {exc}") from None
    profile = parse_profile(data, str(file), file.resolve().parent)
    return dataclasses.replace(profile, path=str(file.resolve()))


def apply_overrides(profile: Profile, **flags: Any) -> Profile:
    """A new profile with flags winning over the file. Keys are flag names (FLAG_KEYS: host, port, api_key,
    device, model, ...) or dotted profile keys (engine.block_size); None values are ignored."""
    where = "command line"
    by_section: dict[str, dict] = {}
    for flag, value in flags.items():
        if value is None:
            continue
        dotted = FLAG_KEYS.get(flag, flag)
        section, _, name = dotted.partition(".")
        if section not in SECTIONS or not name:
            raise ProfileError(f"{where}: {flag}: unknown flag; allowed: "
                               + ", ".join(sorted(FLAG_KEYS)) + ", or a dotted key such as engine.block_size")
        if name in ("api_keys", "served_names") and isinstance(value, str):
            value = [value]
        by_section.setdefault(section, {})[name] = value
    updates = {}
    for section, table in by_section.items():
        current = getattr(profile, section)
        # NOTE: a flag for one of two exclusive keys clears the other, so --api-key beats api_key_env.
        for sec, a, b in EXCLUSIVE:
            if sec == section:
                cleared = {b: _empty(current, b)} if a in table else {a: _empty(current, a)} if b in table else {}
                current = dataclasses.replace(current, **cleared)
        updates[section] = build_section(type(current), table, where, section, Path.cwd(), current, EXCLUSIVE)
    if "distributed" in updates:
        _check_replicas(updates["distributed"], where)
    return dataclasses.replace(profile, **updates)


def _empty(section: Any, key: str) -> Any:
    return () if isinstance(getattr(section, key), tuple) else None


def profile_reference() -> list[tuple[str, str, str, str]]:
    """(dotted key, default as TOML, allowed values, meaning) for every profile key, in file order
    ([[models]] tables take [model]'s keys and a [models.engine] table of [engine]'s)."""
    tables = {**SECTIONS, "upstreams": UpstreamSection}
    return [(f"{name}.{f.name}", show_default(f.default), allowed(f.metadata), f.metadata["doc"])
            for name, cls in tables.items() for f in dataclasses.fields(cls)]


def reference_markdown() -> str:
    """The profile reference as a Markdown table (docs/profiles.md embeds it)."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for dotted, default, accepts, doc in profile_reference():
        lines.append(f"| `{dotted}` | `{default}` | {accepts} | {doc.replace('|', '/')} |")
    return "\n".join(lines)
