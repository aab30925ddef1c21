"""What is available: models in our cache and the HF hub cache, profile files, and a server's models."""
from __future__ import annotations

import json
import os
import struct
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

# Encoder families served through /v1/embeddings rather than generation.
_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "nomic_bert", "nomic-bert", "mpnet",
                  "modernbert", "jina-bert-v2", "t5encoder", "gte"}


@dataclass(frozen=True, slots=True)
class LocalModel:
    """One servable model found on disk."""
    name: str                   # hub-style id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct
    path: str                   # the .gguf file or the model directory
    format: str                 # gguf | safetensors | ctranslate2
    size_bytes: int             # on disk (the GGUF file, or the whole directory)
    quantization: str | None    # GGUF file type (Q4_1, F16 ...), quant method, or the dominant dtype
    capability: str             # chat | completion | embedding | rerank | classify | transcription
    provider: str               # where it was found: llm (our cache) | hf (the HF hub cache)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ProfileEntry:
    """A profile file found in a profile folder."""
    name: str
    path: str
    source: str                 # model.source, or the error that makes the profile unusable
    device: str
    description: str
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- GGUF header (metadata only: GGUFReader parses every token string and takes seconds) --------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _read_value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == 8:  # string
        n = _read(f, "<Q")
        return f.read(n).decode("utf-8", "replace") if keep else f.seek(n, os.SEEK_CUR)
    if vtype == 9:  # array: skipped (token lists are large and not needed here)
        etype, count = _read(f, "<I"), _read(f, "<Q")
        if etype in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[etype]) * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _read_value(f, etype, keep=False)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, int]]:
    """(scalar metadata, {ggml type id: number of elements}) from a GGUF file, reading only its header."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        version = _read(f, "<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is too old")
        num_tensors, num_kv = _read(f, "<Q"), _read(f, "<Q")
        meta: dict[str, Any] = {}
        for _ in range(num_kv):
            key = f.read(_read(f, "<Q")).decode("utf-8", "replace")
            value = _read_value(f, _read(f, "<I"), keep=True)
            if value is not None:
                meta[key] = value
        elements_by_type: dict[int, int] = {}
        for _ in range(num_tensors):
            f.seek(_read(f, "<Q"), os.SEEK_CUR)              # name
            dims = [_read(f, "<Q") for _ in range(_read(f, "<I"))]
            ggml_type = _read(f, "<I")
            _read(f, "<Q")                                    # data offset
            count = 1
            for d in dims:
                count *= d
            elements_by_type[ggml_type] = elements_by_type.get(ggml_type, 0) + count
    return meta, elements_by_type


def gguf_quantization(meta: dict[str, Any], elements_by_type: dict[int, int]) -> str | None:
    """general.file_type's name (Q4_1, F16 ...), else the ggml type holding most weights."""
    import gguf  # NOTE: imported only when a GGUF is listed (~0.15 s); no torch behind it
    if "general.file_type" in meta:
        try:
            name = gguf.LlamaFileType(meta["general.file_type"]).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    if not elements_by_type:
        return None
    dominant = max(elements_by_type, key=elements_by_type.get)
    try:
        return gguf.GGMLQuantizationType(dominant).name
    except ValueError:
        return f"type{dominant}"


def describe_gguf(path: Path, name: str, provider: str) -> LocalModel:
    meta, types = read_gguf_header(path)
    arch = str(meta.get("general.architecture", ""))
    if arch in _ENCODER_TYPES or f"{arch}.pooling_type" in meta:
        capability = "embedding"
    else:
        capability = "chat" if "tokenizer.chat_template" in meta else "completion"
    return LocalModel(name, str(path), "gguf", path.stat().st_size, gguf_quantization(meta, types),
                      capability, provider)


# --- HF-style directories ------------------------------------------------------------------------------------

def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _dominant_dtype(folder: Path) -> str | None:
    """The safetensors dtype holding most bytes, read from the files' JSON headers only."""
    totals: dict[str, int] = {}
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                totals[info["dtype"]] = totals.get(info["dtype"], 0) + end - start
    return max(totals, key=totals.get) if totals else None


def dir_capability(folder: Path) -> str:
    """rerank / classify for sequence classifiers, embedding for sentence-transformers folders and encoders, chat
    with a chat template, else completion."""
    config = _json(folder / "config.json")
    archs = config.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):   # a cross-encoder has one label
        return "rerank" if config.get("num_labels", len(config.get("id2label") or {}) or 2) == 1 else "classify"
    if (folder / "modules.json").exists() or config.get("model_type") in _ENCODER_TYPES or \
            any(a.endswith("Model") for a in archs):
        return "embedding"
    tok_config = _json(folder / "tokenizer_config.json")
    has_template = "chat_template" in tok_config or (folder / "chat_template.jinja").exists() or \
        (folder / "chat_template.json").exists()
    return "chat" if has_template else "completion"


def describe_dir(folder: Path, name: str, provider: str, size_bytes: int | None = None) -> LocalModel | None:
    """A LocalModel for an HF-style folder holding safetensors weights (None if it holds none)."""
    if not any(folder.glob("*.safetensors")):
        return None
    config = _json(folder / "config.json")
    quant = (config.get("quantization_config") or {}).get("quant_method") or _dominant_dtype(folder)
    if size_bytes is None:
        size_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return LocalModel(name, str(folder), "safetensors", size_bytes, quant, dir_capability(folder), provider)


def describe_ctranslate2(folder: Path, name: str, provider: str) -> LocalModel | None:
    """A LocalModel for a CTranslate2 Whisper folder (faster-whisper's layout), None for anything else."""
    from engine.ctranslate2_format import ctranslate2_dtype, is_ctranslate2_whisper
    if not is_ctranslate2_whisper(folder):
        return None
    size_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return LocalModel(name, str(folder), "ctranslate2", size_bytes, ctranslate2_dtype(folder), "transcription",
                      provider)


def _describe_folder(folder: Path, name: str, provider: str) -> list[LocalModel]:
    try:
        if (whisper := describe_ctranslate2(folder, name, provider)) is not None:
            return [whisper]
    except (OSError, ValueError):
        return []   # NOTE: a partial download is skipped, not an error for the whole listing
    found = []
    for gguf_file in sorted(folder.glob("*.gguf")):
        try:
            found.append(describe_gguf(gguf_file, name, provider))
        except (OSError, ValueError):
            continue  # NOTE: a partial download is skipped, not an error for the whole listing
    entry = describe_dir(folder, name, provider)
    return found + ([entry] if entry else [])


def list_llm_models() -> list[LocalModel]:
    """Models in our cache, models_dir()/<org>--<name>/ holding GGUF files or safetensors, and in the
    packaged build the models shipped inside it (same layout under its models/ folder)."""
    import sys
    from engine.weights import models_dir
    roots = [models_dir()]
    if getattr(sys, "_MEIPASS", None):
        roots.append(Path(sys._MEIPASS) / "models")
    models = []
    for root in roots:
        if root.is_dir():
            for folder in sorted(p for p in root.iterdir() if p.is_dir()):
                models += _describe_folder(folder, folder.name.replace("--", "/", 1), "llm")
    return models


def list_hf_models() -> list[LocalModel]:
    """Models in the HF hub cache (HF_HUB_CACHE / HF_HOME honoured), newest revision of each repo."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface"), "hub")
    if not os.path.isdir(cache):
        return []  # NOTE: checked first so listing an empty machine never imports huggingface_hub's cache code
    from huggingface_hub import scan_cache_dir
    try:
        info = scan_cache_dir(cache)
    except Exception:  # noqa: BLE001 - a damaged cache must not break `llm list`
        return []
    models = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        latest = max(repo.revisions, key=lambda r: r.last_modified)
        for m in _describe_folder(Path(latest.snapshot_path), repo.repo_id, "hf"):
            models.append(m if m.format == "gguf" else LocalModel(
                m.name, m.path, m.format, latest.size_on_disk, m.quantization, m.capability, m.provider))
    return models


def list_local_models() -> list[LocalModel]:
    return list_llm_models() + list_hf_models()


def find_profile(name_or_path: str) -> Path:
    """A profile path from a path or a bare name looked up in ./profiles, $LLM_HOME/profiles, then the
    profiles shipped beside the package."""
    from launcher.profile import ProfileError
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix == ".toml" or os.sep in name_or_path:
        return candidate
    for folder in profile_dirs():
        if (folder / f"{name_or_path}.toml").is_file():
            return folder / f"{name_or_path}.toml"
    looked = ", ".join(str(d) for d in profile_dirs())
    raise ProfileError(f"{name_or_path}: no such profile (looked for {name_or_path}.toml in {looked})")


def profile_dirs() -> list[Path]:
    """Folders searched for profiles, most specific first."""
    from kernels.user_dir import llm_home
    shipped = Path(__file__).resolve().parent.parent / "profiles"
    dirs = [Path.cwd() / "profiles", llm_home() / "profiles", shipped]
    unique: list[Path] = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def list_profiles() -> list[ProfileEntry]:
    """Profiles in the profile folders; a broken profile is listed with its error, not dropped."""
    from launcher.profile import ProfileError, load_profile
    entries, seen = [], set()
    for folder in profile_dirs():
        for file in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            if file.stem in seen:
                continue  # NOTE: a profile in a more specific folder shadows one of the same name
            seen.add(file.stem)
            try:
                p = load_profile(file)
                entries.append(ProfileEntry(file.stem, str(file), p.model.source, p.engine.device,
                                            p.description))
            except ProfileError as exc:
                entries.append(ProfileEntry(file.stem, str(file), "", "", "", error=str(exc)))
    return entries


def list_server_models(url: str, api_key: str | None = None, timeout: float = 5.0) -> list[dict[str, Any]]:
    """GET {url}/v1/models of a running OpenAI-compatible server; raises OSError when it cannot be reached."""
    base = url.rstrip("/").removesuffix("/v1")
    request = urllib.request.Request(f"{base}/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read()).get("data", [])
