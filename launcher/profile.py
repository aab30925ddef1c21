"""TOML serving profiles -> frozen dataclasses; unknown keys and bad values are errors naming file and key."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_NUM_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS
from engine.weights import DEFAULT_MODEL

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(text: str) -> bool:
    """Whether text has the shape of a hub repo id (org/name)."""
    return bool(_REPO_ID.match(text))


class ProfileError(ValueError):
    """A profile (or a flag overriding it) is invalid; the message is one line naming file and key."""


def _key(default: Any, doc: str, kind: str, *, choices: tuple = (), lo: float | None = None,
         hi: float | None = None, lo_open: bool = False) -> Any:
    """A profile key: its default, its documentation and how its value is checked (kept in metadata)."""
    meta = {"doc": doc, "kind": kind, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class ModelSection:
    """[model]: what to serve and under which names."""
    source: str = _key(DEFAULT_MODEL, "HF repo id (org/name), local HF directory, or .gguf file", "source")
    served_names: tuple[str, ...] = _key((), "names clients may use in `model`; empty: the source", "str_list")
    dtype: str = _key("auto", "weight/activation dtype; auto: bfloat16 on CUDA, float32 on CPU", "str",
                      choices=("auto", "float32", "float16", "bfloat16"))
    max_model_len: int | str | None = _key(None, "context window in tokens; unset: the model's (startup "
                                           "fails if the KV cache cannot hold it); auto: the largest that "
                                           "fits, up to the model's", "int_or_auto", lo=1)
    revision: str | None = _key(None, "hub revision (branch, tag or commit) when source is a repo id", "str")
    chat_template: str | None = _key(None, "Jinja chat template file overriding the model's", "path")
    tokenizer: str | None = _key(None, "tokenizer repo id or directory, if not the model's own", "source")
    offline: bool = _key(False, "never contact a model hub; a missing model is an error. Default: true "
                         "when LLM_OFFLINE=1 is set", "bool")

    @property
    def names(self) -> tuple[str, ...]:
        """The served names, the source (for repo ids) or the file/folder name when none are set."""
        if self.served_names:
            return self.served_names
        return (self.source,) if _REPO_ID.match(self.source) else (Path(self.source).name,)


@dataclass(frozen=True, slots=True)
class EngineSection:
    """[engine]: device, batching and KV cache."""
    device: str = _key("auto", "auto: cuda when a GPU is present, else cpu", "str",
                       choices=("auto", "cuda", "cpu"))
    max_num_seqs: int = _key(DEFAULT_MAX_NUM_SEQS, "most sequences in one batch", "int", lo=1)
    max_num_batched_tokens: int = _key(DEFAULT_MAX_NUM_BATCHED_TOKENS,
                                       "most tokens (prefill chunks + decodes) in one step", "int", lo=1)
    block_size: int = _key(DEFAULT_BLOCK_SIZE, "tokens per KV cache block", "int", choices=(8, 16, 32, 64, 128))
    kv_cache_memory_fraction: float | None = _key(
        None, "on CUDA, the share of GPU memory for weights + KV cache (vLLM's gpu_memory_utilization); "
        "unset: 0.9; exclusive with kv_cache_gib", "float",
        lo=0.0, hi=1.0, lo_open=True)
    kv_cache_gib: float | None = _key(None, "KV cache size in GiB (unset on CPU: 2); exclusive with "
                                      "kv_cache_memory_fraction",
                                      "float", lo=0.0, lo_open=True)
    enable_prefix_caching: bool = _key(True, "reuse KV blocks of shared prompt prefixes", "bool")
    cuda_graphs: bool = _key(True, "capture decode steps as CUDA graphs (ignored on CPU)", "bool")
    cuda_graph_sizes: tuple[int, ...] = _key((), "batch sizes to capture; empty: 1, 2, 4, 8 then steps of "
                                             "8 up to max_num_seqs", "int_list", lo=1)
    seed: int = _key(0, "seed for requests that set none", "int", lo=0)


@dataclass(frozen=True, slots=True)
class KernelsSection:
    """[kernels]: Triton kernel tuning on the GPU, the quantized-weight kernel on the CPU."""
    autotune: bool = _key(True, "tune kernel configs for this GPU at startup (cached)", "bool")
    cache_dir: str | None = _key(None, "where tuned configs are kept; unset: $LLM_HOME/autotune", "path")
    cpu_kernels: bool = _key(True, "on CPU, C kernels compiled once with the system's cc: GGUF "
                             "Q4_x/Q5_x/Q6_K/Q8_0 weights multiplied in packed form (batches up to 64 "
                             "rows), paged decode attention, RMSNorm, rotary, SiLU-mul; false: torch ops, "
                             "float32 weights",
                             "bool")
    cpu_float_copies: bool | None = _key(None, "on CPU, keep float32 copies of the packed weights for prompt "
                                         "chunks over 64 tokens (faster prefill, ~5x the packed size in "
                                         "memory); unset: only while they fit in a quarter of the memory",
                                         "bool")


@dataclass(frozen=True, slots=True)
class ServerSection:
    """[server]: the HTTP side."""
    host: str = _key("127.0.0.1", "address to bind; 0.0.0.0 for all interfaces", "str")
    port: int = _key(8000, "TCP port; 0 picks a free one", "int", lo=0, hi=65535)
    api_keys: tuple[str, ...] = _key((), "accepted Bearer keys on /v1/*; empty (and no api_key_env): no auth",
                                     "str_list")
    api_key_env: str | None = _key(None, "name of an env var holding the keys (comma-separated); "
                                   "exclusive with api_keys", "str")
    cors_origins: tuple[str, ...] = _key((), "origins allowed by CORS ('*' for any); empty: CORS off",
                                         "str_list")
    max_request_body_bytes: int = _key(16 * 1024 * 1024, "larger request bodies get 413", "int", lo=1024)
    max_queued_requests: int = _key(1024, "requests waiting beyond this get 503", "int", lo=1)
    request_timeout_s: float = _key(600.0, "a request running longer is aborted", "float", lo=0.0, lo_open=True)
    log_requests: bool = _key(False, "log one line per request", "bool")

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
    temperature: float | None = _key(None, "sampling temperature; 0 is greedy", "float", lo=0.0)
    top_p: float | None = _key(None, "nucleus sampling mass", "float", lo=0.0, hi=1.0, lo_open=True)
    top_k: int | None = _key(None, "sample from the k most likely tokens; 0 or -1: off", "int", lo=-1)
    min_p: float | None = _key(None, "drop tokens below min_p x the top probability", "float", lo=0.0, hi=1.0)
    repetition_penalty: float | None = _key(None, "HF-style penalty on seen tokens; 1: off", "float",
                                            lo=0.0, lo_open=True)
    presence_penalty: float | None = _key(None, "OpenAI presence penalty", "float", lo=-2.0, hi=2.0)
    frequency_penalty: float | None = _key(None, "OpenAI frequency penalty", "float", lo=-2.0, hi=2.0)
    max_tokens: int | None = _key(None, "completion length when a request sets none; unset: up to "
                                  "max_model_len", "int", lo=1)
    use_generation_config: bool = _key(True, "take defaults from the model's generation_config.json for "
                                       "keys not set here", "bool")

    def sampling_overrides(self) -> dict[str, float | int]:
        """The sampling keys this profile sets, as SamplingParams keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "use_generation_config" and getattr(self, f.name) is not None}


@dataclass(frozen=True, slots=True)
class Profile:
    """A whole serving profile; `path` is the file it came from (None for the built-in default)."""
    model: ModelSection = field(default_factory=ModelSection)
    engine: EngineSection = field(default_factory=EngineSection)
    kernels: KernelsSection = field(default_factory=KernelsSection)
    server: ServerSection = field(default_factory=ServerSection)
    defaults: DefaultsSection = field(default_factory=DefaultsSection)
    description: str = ""
    path: str | None = None


SECTIONS: dict[str, type] = {"model": ModelSection, "engine": EngineSection, "kernels": KernelsSection,
                             "server": ServerSection, "defaults": DefaultsSection}
EXCLUSIVE = (("engine", "kv_cache_memory_fraction", "kv_cache_gib"), ("server", "api_keys", "api_key_env"))
FLAG_KEYS = {"host": "server.host", "port": "server.port", "api_key": "server.api_keys",
             "device": "engine.device", "model": "model.source", "max_model_len": "model.max_model_len",
             "offline": "model.offline", "served_name": "model.served_names", "dtype": "model.dtype",
             "max_num_seqs": "engine.max_num_seqs", "block_size": "engine.block_size",
             "kv_cache_gib": "engine.kv_cache_gib", "cuda_graphs": "engine.cuda_graphs",
             "autotune": "kernels.autotune", "chat_template": "model.chat_template"}


def engine_kwargs(profile: Profile) -> dict[str, Any]:
    """Keyword arguments for engine.config.EngineConfig (all but the resolved model path); unset keys are
    left out so the engine's own defaults apply."""
    e, m = profile.engine, profile.model
    kwargs = {"served_name": m.names[0], "dtype": m.dtype, "device": e.device, "max_model_len": m.max_model_len,
              "block_size": e.block_size, "kv_cache_gib": e.kv_cache_gib,
              "kv_cache_memory_fraction": e.kv_cache_memory_fraction, "max_num_seqs": e.max_num_seqs,
              "max_num_batched_tokens": e.max_num_batched_tokens,
              "enable_prefix_caching": e.enable_prefix_caching, "seed": e.seed,
              "cuda_graphs": e.cuda_graphs, "cuda_graph_sizes": e.cuda_graph_sizes,
              "autotune": profile.kernels.autotune, "autotune_cache_dir": profile.kernels.cache_dir,
              "cpu_kernels": profile.kernels.cpu_kernels,
              "cpu_float_copies": profile.kernels.cpu_float_copies}
    return {k: v for k, v in kwargs.items() if v is not None}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def default_profile() -> Profile:
    """The built-in profile: the default model on whatever device is present."""
    return Profile(model=ModelSection(offline=_env_flag("LLM_OFFLINE")))


def _allowed(meta: dict) -> str:
    """What a key accepts, in words (used in errors and in the reference table)."""
    kind, choices, lo, hi = meta["kind"], meta["choices"], meta["lo"], meta["hi"]
    if choices:
        return "one of " + ", ".join(repr(c) if isinstance(c, str) else str(c) for c in choices)
    words = {"bool": "true or false", "str": "a string", "path": "a file path", "source": "a repo id or path",
             "str_list": "a list of strings", "int": "an integer", "float": "a number",
             "int_list": "a list of integers", "int_or_auto": "\"auto\" or an integer"}[kind]
    if lo is not None or hi is not None:
        low = "" if lo is None else f"{'>' if meta['lo_open'] else '>='} {lo:g}"
        high = "" if hi is None else f"<= {hi:g}"
        words += " " + " and ".join(p for p in (low, high) if p)
    return words


def _check(value: Any, meta: dict, base_dir: Path | None) -> Any:
    """Validate one value against its key's metadata; returns the normalized value or raises ValueError."""
    kind = meta["kind"]

    def number_ok(v: Any, integer: bool) -> bool:
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            return False
        lo, hi = meta["lo"], meta["hi"]
        below = lo is not None and (v <= lo if meta["lo_open"] else v < lo)
        return not below and not (hi is not None and v > hi)

    ok = {"bool": lambda v: isinstance(v, bool),
          "str": lambda v: isinstance(v, str) and v != "",
          "path": lambda v: isinstance(v, str) and v != "",
          "source": lambda v: isinstance(v, str) and v != "",
          "str_list": lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) and s for s in v),
          "int": lambda v: number_ok(v, True),
          "float": lambda v: number_ok(v, False),
          "int_list": lambda v: isinstance(v, (list, tuple)) and all(number_ok(i, True) for i in v),
          "int_or_auto": lambda v: v == "auto" or number_ok(v, True)}[kind]
    if not ok(value) or (meta["choices"] and value not in meta["choices"]):
        raise ValueError(f"must be {_allowed(meta)}, got {value!r}")
    if kind == "float":
        return float(value)
    if kind in ("str_list", "int_list"):
        return tuple(value)
    if kind == "path" or (kind == "source" and _looks_like_path(value, base_dir)):
        path = Path(value).expanduser()
        return str(path if path.is_absolute() or base_dir is None else (base_dir / path).resolve())
    return value


def _looks_like_path(value: str, base_dir: Path | None) -> bool:
    """A source is a path if it says so (./, ../, /, ~, .gguf) or names something on disk; else a repo id."""
    if value.startswith(("/", "./", "../", "~")) or value.endswith(".gguf") or not _REPO_ID.match(value):
        return True
    return (base_dir or Path.cwd()).joinpath(value).exists()


def _build_section(cls: type, table: dict, where: str, name: str, base_dir: Path | None,
                   current: Any = None) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            did = f" (did you mean {name}.{hint[0]}?)" if hint else ""
            raise ProfileError(f"{where}: {name}.{key}: unknown key{did}; allowed keys in [{name}]: "
                               + ", ".join(fields))
        try:
            values[key] = _check(value, fields[key].metadata, base_dir)
        except ValueError as exc:
            raise ProfileError(f"{where}: {name}.{key}: {exc}") from None
    section = dataclasses.replace(current, **values) if current is not None else cls(**values)
    for sec, a, b in EXCLUSIVE:
        if sec == name and getattr(section, a) not in (None, ()) and getattr(section, b) not in (None, ()):
            culprit = b if b in table else a
            raise ProfileError(f"{where}: {name}.{culprit}: set either {name}.{a} or {name}.{b}, not both")
    return section


def parse_profile(data: dict, where: str, base_dir: Path | None = None) -> Profile:
    """Build a Profile from a parsed TOML table; `where` names the source in errors."""
    sections = {}
    for name, table in data.items():
        if name == "description":
            if not isinstance(table, str):
                raise ProfileError(f"{where}: description: must be a string, got {table!r}")
            continue
        if name not in SECTIONS:
            raise ProfileError(f"{where}: [{name}]: unknown section; allowed: description, "
                               + ", ".join(f"[{s}]" for s in SECTIONS))
        if not isinstance(table, dict):
            raise ProfileError(f"{where}: {name}: must be a table ([{name}]), got {table!r}")
        sections[name] = table
    model_table = dict(sections.get("model", {}))
    model_table.setdefault("offline", _env_flag("LLM_OFFLINE"))
    built = {name: _build_section(cls, model_table if name == "model" else sections.get(name, {}),
                                  where, name, base_dir) for name, cls in SECTIONS.items()}
    return Profile(**built, description=data.get("description", ""), path=None)


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
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ProfileError(f"{where}: {flag}: unknown flag; allowed: "
                               + ", ".join(sorted(FLAG_KEYS)) + ", or a dotted key such as engine.block_size")
        if key in ("api_keys", "served_names") and isinstance(value, str):
            value = [value]
        by_section.setdefault(section, {})[key] = value
    updates = {}
    for section, table in by_section.items():
        current = getattr(profile, section)
        # NOTE: a flag for one of two exclusive keys clears the other, so --api-key beats api_key_env.
        for sec, a, b in EXCLUSIVE:
            if sec == section:
                cleared = {b: _empty(current, b)} if a in table else {a: _empty(current, a)} if b in table else {}
                current = dataclasses.replace(current, **cleared)
        updates[section] = _build_section(type(current), table, where, section, Path.cwd(), current)
    return dataclasses.replace(profile, **updates)


def _empty(section: Any, key: str) -> Any:
    return () if isinstance(getattr(section, key), tuple) else None


def profile_reference() -> list[tuple[str, str, str, str]]:
    """(dotted key, default as TOML, allowed values, meaning) for every profile key, in file order."""
    rows = []
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default
            shown = ("(unset)" if default is None else str(default).lower() if isinstance(default, bool)
                     else repr(list(default)) if isinstance(default, tuple) else
                     f'"{default}"' if isinstance(default, str) else str(default))
            rows.append((f"{name}.{f.name}", shown, _allowed(f.metadata), f.metadata["doc"]))
    return rows


def reference_markdown() -> str:
    """The profile reference as a Markdown table (docs/profiles.md embeds it)."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for key, default, allowed, doc in profile_reference():
        lines.append(f"| `{key}` | `{default}` | {allowed} | {doc.replace('|', '/')} |")
    return "\n".join(lines)
