"""The `llm` CLI through Click's runner: help, list --json against a temp LLM_HOME, pull and serve errors,
and that --help and list import no torch."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def home(tmp_path, monkeypatch, default_gguf_path, minilm_dir):
    """A temp LLM_HOME holding the default GGUF and the MiniLM folder (linked), a user profile, a broken
    one, and an HF hub cache holding one repo; cwd has no ./profiles."""
    models = tmp_path / "home" / "models"
    gguf_dir = models / "HuggingFaceTB--SmolLM2-135M-Instruct"
    gguf_dir.mkdir(parents=True)
    (gguf_dir / Path(default_gguf_path).name).symlink_to(default_gguf_path)
    (models / "sentence-transformers--all-MiniLM-L6-v2").symlink_to(minilm_dir)
    profiles = tmp_path / "home" / "profiles"
    profiles.mkdir()
    (profiles / "mine.toml").write_text('description = "my profile"\n[model]\nsource = "org/mini"\n'
                                        '[engine]\ndevice = "cpu"\n')
    (profiles / "broken.toml").write_text("[engine]\nblock_size = 3\n")
    repo = tmp_path / "hf" / "hub" / "models--org--mini"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    for name in ("config.json", "modules.json", "model.safetensors"):
        (repo / "blobs" / name).symlink_to(Path(minilm_dir) / name)
        (repo / "snapshots" / "abc" / name).symlink_to(repo / "blobs" / name)
    monkeypatch.setenv("LLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args, **kwargs):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kwargs)


def test_help_texts():
    top = invoke("--help")
    assert top.exit_code == 0
    for command in ("serve", "list", "pull", "bench"):
        assert command in top.output
    serve = invoke("serve", "--help").output
    for flag in ("--host", "--port", "--api-key", "--device", "--model", "--max-model-len", "--offline", "--set"):
        assert flag in serve
    bench = invoke("bench", "serve", "--help").output
    for flag in ("--url", "--num-prompts", "--request-rate", "--max-concurrency", "--dataset", "--input-len",
                 "--output-len", "--ignore-eos", "--endpoint", "--seed", "--result-json", "--plot"):
        assert flag in bench
    assert "--profile" in invoke("bench", "throughput", "--help").output
    assert "--batch-size" in invoke("bench", "latency", "--help").output


def test_list_json_content(home, default_gguf_path, minilm_dir):
    import gguf
    from safetensors import safe_open
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    by_name = {p["name"]: p for p in data["profiles"]}
    assert by_name["mine"]["source"] == "org/mini" and by_name["mine"]["device"] == "cpu"
    assert by_name["mine"]["description"] == "my profile"
    assert "engine.block_size" in by_name["broken"]["error"]
    assert by_name["default"]["path"] == str(REPO / "profiles" / "default.toml")   # shipped profiles too

    models = {(m["provider"], m["name"]): m for m in data["models"]}
    smol = models[("llm", "HuggingFaceTB/SmolLM2-135M-Instruct")]
    reader = gguf.GGUFReader(default_gguf_path)   # the reference parser (slow: it reads every token)
    file_type = int(reader.fields["general.file_type"].contents())
    assert smol["quantization"] == gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") == "Q4_1"
    assert smol["format"] == "gguf" and smol["size_bytes"] == os.path.getsize(default_gguf_path)
    assert smol["capability"] == "chat" and "tokenizer.chat_template" in reader.fields

    mini = models[("llm", "sentence-transformers/all-MiniLM-L6-v2")]
    bytes_by_dtype = {}
    with safe_open(f"{minilm_dir}/model.safetensors", framework="numpy") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            dtype = str(f.get_slice(key).get_dtype())
            bytes_by_dtype[dtype] = bytes_by_dtype.get(dtype, 0) + tensor.nbytes
    assert mini["quantization"] == max(bytes_by_dtype, key=bytes_by_dtype.get) == "F32"
    assert (mini["format"], mini["capability"]) == ("safetensors", "embedding")
    hub = models[("hf", "org/mini")]
    assert (hub["format"], hub["capability"], hub["quantization"]) == ("safetensors", "embedding", "F32")
    assert "server" not in data


def test_list_filters(home):
    data = json.loads(invoke("list", "--json", "--capability", "embedding").output)
    assert data["profiles"] == [] and {m["capability"] for m in data["models"]} == {"embedding"}
    data = json.loads(invoke("list", "--json", "--provider", "hf").output)
    assert data["profiles"] == [] and [m["name"] for m in data["models"]] == ["org/mini"]
    table = invoke("list").output
    assert "Q4_1" in table and "my profile" in table and "org/mini" in table


def test_list_url_unreachable(home):
    with socket.socket() as s:     # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = invoke("list", "--json", "--url", f"http://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert f"cannot reach http://127.0.0.1:{port}" in result.stderr
    assert "error" in json.loads(result.stdout)["server"]


def test_pull_errors_without_network(home, monkeypatch):
    result = invoke("pull", "not a model!")
    assert result.exit_code == 1
    assert "unknown model 'not a model!'" in result.output and "HuggingFaceTB/SmolLM2-135M-Instruct" in result.output
    result = invoke("pull", "some-org/some-model", "--offline")
    assert result.exit_code == 1 and "offline mode is on" in result.output
    # a hub that refuses connections: the error names the repo and the hub, with no traceback
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    result = subprocess.run([sys.executable, "-m", "launcher.cli", "pull", "some-org/some-model"],
                            capture_output=True, text=True, timeout=60, env={**os.environ})
    assert result.returncode == 1, result.stderr
    assert "could not fetch some-org/some-model from the Hugging Face hub" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_parses_and_overrides(home):
    result = invoke("serve", "mine", "--port", "9123", "--api-key", "k1", "--api-key", "k2", "--device", "cuda",
                    "--max-model-len", "auto", "--set", "engine.block_size=32", "--set", "model.revision=v2",
                    "--dry-run")
    assert result.exit_code == 0, result.output
    eff = json.loads(result.output)
    assert eff["model"]["source"] == "org/mini" and eff["model"]["revision"] == "v2"
    assert (eff["server"]["port"], eff["server"]["api_keys"]) == (9123, ["k1", "k2"])
    assert (eff["engine"]["device"], eff["engine"]["block_size"], eff["model"]["max_model_len"]) == ("cuda", 32, "auto")
    bad = invoke("serve", "broken")
    assert bad.exit_code == 1 and "broken.toml: engine.block_size: must be one of 8, 16, 32" in bad.output
    bad = invoke("serve", "--set", "engine.max_num_seqs=0", "--dry-run")
    assert bad.exit_code == 1 and "engine.max_num_seqs: must be an integer >= 1" in bad.output


def test_bench_serve_reports_unreachable_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = invoke("bench", "serve", "--url", f"http://127.0.0.1:{port}", "--num-prompts", "2", "--quiet")
    assert result.exit_code == 1 and f"cannot reach http://127.0.0.1:{port}" in result.output
    result = invoke("bench", "serve", "--request-rate", "-1")
    assert result.exit_code == 2 and "must be positive" in result.output
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:   # --plot fails before any request is sent
        result = invoke("bench", "serve", "--url", f"http://127.0.0.1:{port}", "--plot", "x.png")
        assert result.exit_code == 1 and "--plot needs matplotlib" in result.output


def test_help_and_list_import_no_torch(home):
    """Run in a fresh interpreter: --help and list must not pull in torch, and must answer fast."""
    # NOTE: CPU time, not wall time, so the bound holds on a loaded machine; it includes importing the CLI
    code = ("import sys, time; t = time.process_time()\n"
            "from click.testing import CliRunner\nfrom launcher.cli import main\n"
            "for args in (['--help'], ['bench', 'serve', '--help'], ['list'], ['list', '--json']):\n"
            "    r = CliRunner().invoke(main, args)\n"
            "    assert r.exit_code == 0, r.output\n"
            "print(time.process_time() - t, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ}, cwd=home)
    assert out.returncode == 0, out.stderr
    seconds, torch_loaded, transformers_loaded = out.stdout.split()
    assert torch_loaded == "False" and transformers_loaded == "False"
    assert float(seconds) < 1.0, "import + two --help + two list calls should take well under a second each"
