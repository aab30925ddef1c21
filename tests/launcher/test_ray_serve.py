"""`llm serve` with [distributed] replicas on Ray Serve: the deployment options (always), and two replicas of
the default model for real (slow; skipped where Ray is not installed: scripts/test_ray installs it)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.weights import DEFAULT_MODEL
from launcher.profile import ProfileError, apply_overrides, default_profile, parse_profile
from launcher.ray_serve import deployment_options
from launcher.server.settings import LaunchSpec, ModelSettings, ServerSettings
from tests.launcher.test_serve_cli import READY, descendants

REPO = Path(__file__).resolve().parents[2]
LLM = Path(sys.executable).parent / "llm"
STARTUP_TIMEOUT_S = 240
REPLACE_TIMEOUT_S = 120


def _spec(device: str, tensor_parallel_size: int = 1) -> LaunchSpec:
    engine = EngineConfig(model="m.gguf", device=device, tensor_parallel_size=tensor_parallel_size)
    return LaunchSpec(ServerSettings(max_queued_requests=64), (ModelSettings(engine, ("m",)),))


def test_replica_keys_parse_and_check():
    d = parse_profile({"distributed": {"replicas": "auto", "min_replicas": 2, "max_replicas": 3,
                                       "ray_address": "ray://head:10001"}}, "p.toml").distributed
    assert d.uses_ray and d.replicas == "auto" and d.ray_address == "ray://head:10001"
    assert not default_profile().distributed.uses_ray
    assert apply_overrides(default_profile(), **{"distributed.replicas": 2}).distributed.uses_ray
    with pytest.raises(ProfileError, match=r"distributed\.ray_address: must be .*ray://host:port"):
        parse_profile({"distributed": {"ray_address": "head:6379"}}, "p.toml")
    with pytest.raises(ProfileError, match=r"distributed\.min_replicas: 3 is more than distributed\.max_replicas"):
        parse_profile({"distributed": {"min_replicas": 3, "max_replicas": 2}}, "p.toml")
    with pytest.raises(ProfileError, match=r"distributed\.replicas: must be"):
        parse_profile({"distributed": {"replicas": 0}}, "p.toml")


def test_deployment_options():
    fixed = parse_profile({"distributed": {"replicas": 2, "tensor_parallel_size": 2}}, "p.toml").distributed
    cpu = deployment_options(fixed, _spec("cpu"), {"CPU": 16.0, "GPU": 8.0})
    assert cpu["num_replicas"] == 2 and cpu["ray_actor_options"] == {"num_cpus": 8}   # half the cores each
    assert cpu["max_ongoing_requests"] == 64 and "autoscaling_config" not in cpu
    gpu = deployment_options(fixed, _spec("auto", 2), {"CPU": 16.0, "GPU": 8.0})
    assert gpu["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 2}   # one GPU per tensor-parallel rank
    assert deployment_options(fixed, _spec("auto"), {"CPU": 2.0})["ray_actor_options"] == {"num_cpus": 1}
    two = LaunchSpec(ServerSettings(), (ModelSettings(EngineConfig(model="a", tensor_parallel_size=2), ("a",)),
                                        ModelSettings(EngineConfig(model="b"), ("b",))))
    # a replica holds every model: their GPUs add up
    assert deployment_options(fixed, two, {"CPU": 16.0, "GPU": 8.0})["ray_actor_options"]["num_gpus"] == 3
    auto = parse_profile({"distributed": {"replicas": "auto", "max_replicas": 3,
                                          "target_ongoing_requests": 4}}, "p.toml").distributed
    options = deployment_options(auto, _spec("cpu"), {"CPU": 12.0})
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 1,
                                             "target_ongoing_requests": 4.0}
    assert "num_replicas" not in options and options["ray_actor_options"] == {"num_cpus": 4}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pump(stream, sink: list[str]) -> None:
    for line in stream:
        sink.append(line.rstrip("\n"))


def _engines(pid: int) -> set[int]:
    return {p for p, cmdline in descendants(pid).items() if "engine.core_process" in cmdline}


def _metrics_replicas(url: str, tries: int = 40) -> set[str]:
    """The replica ids /metrics names, over several scrapes (each lands on one replica)."""
    seen = set()
    for _ in range(tries):
        with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("llm:replica_info{"):
                    seen.add(line.split('replica_id="')[1].split('"')[0])
        if len(seen) >= 2:
            break
    return seen


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_replicas_spread_replace_and_stop(default_gguf_path, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (scripts/test_ray installs it)")
    from openai import OpenAI
    port = _free_port()
    profile = tmp_path / "replicas.toml"
    # Small context and KV cache, so that two engines (each ~1 GB resident) fit beside Ray.
    profile.write_text(f"""
[model]
source = "{DEFAULT_MODEL}"
served_names = ["smol"]
max_model_len = 512

[engine]
device = "cpu"
kv_cache_gib = 0.05
max_num_seqs = 8

[distributed]
replicas = 2
""")
    started = time.monotonic()
    proc = subprocess.Popen([str(LLM), "serve", str(profile), "--port", str(port), "--offline"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    errors: list[str] = []
    for stream, sink in ((proc.stdout, lines), (proc.stderr, errors)):
        threading.Thread(target=_pump, args=(stream, sink), daemon=True).start()
    try:
        while not lines:
            assert proc.poll() is None, f"llm serve exited {proc.returncode}:\n" + "\n".join(errors)
            assert time.monotonic() - started < STARTUP_TIMEOUT_S, "no ready line:\n" + "\n".join(errors)
            time.sleep(0.2)
        ready = READY.match(lines[0])
        url = f"http://127.0.0.1:{port}"
        assert ready and ready["url"] == url and ready["name"] == "smol" and ready["device"] == "cpu", lines[0]
        assert int(ready["mml"]) == 512
        print(f"ready in {time.monotonic() - started:.1f}s")
        engines = _engines(proc.pid)
        assert len(engines) == 2, descendants(proc.pid)   # one engine process per replica

        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def complete(i: int) -> tuple[str, str]:
            raw = client.completions.with_raw_response.create(model="smol", prompt=f"Count to {i}:",
                                                              max_tokens=4, temperature=0)
            return raw.headers["x-llm-replica"], raw.parse().choices[0].text

        def chat_stream(i: int) -> tuple[str, str]:
            raw = client.chat.completions.with_raw_response.create(
                model="smol", messages=[{"role": "user", "content": f"Say {i}"}], max_tokens=4, stream=True)
            text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
            return raw.headers["x-llm-replica"], text

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(complete, range(12))) + list(pool.map(chat_stream, range(8)))
        assert all(text for _, text in answers), answers
        replicas = {r for r, _ in answers}
        assert len(replicas) == 2, answers                       # spread over both replicas
        assert {r for r, _ in answers[12:]} <= replicas
        assert _metrics_replicas(url) == replicas                # /metrics says which replica answered

        # One replica's engine dies: its health check fails and Serve replaces it; the other serves meanwhile.
        victim = min(engines)
        killed = time.monotonic()
        subprocess.run(["kill", "-9", str(victim)], check=True)
        retrying = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=6, timeout=120)
        during: list[str] = []
        while True:
            raw = retrying.completions.with_raw_response.create(model="smol", prompt="Hello", max_tokens=2)
            assert raw.parse().choices[0].text is not None
            during.append(raw.headers["x-llm-replica"])
            now = _engines(proc.pid)
            if len(now) == 2 and victim not in now and set(during[-4:]) - replicas:
                break   # a new engine runs, and its replica (a new id) answers
            assert time.monotonic() - killed < REPLACE_TIMEOUT_S, f"not replaced: {during} {now}"
            time.sleep(0.5)
        print(f"replaced in {time.monotonic() - killed:.1f}s; answered by {during}")
        new = set(during) - replicas
        assert len(new) == 1 and len(set(during) & replicas) == 1, during   # the survivor, then the newcomer
        survivor = (set(during) & replicas).pop()
        assert _metrics_replicas(url) == {survivor, *new}

        # SIGTERM: Serve and the local Ray stop, every process under llm serve goes.
        everything = descendants(proc.pid)
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, "\n".join(errors)
        print(f"stopped in {time.monotonic() - stopping:.1f}s")
        time.sleep(1.0)
        left = {p: c for p, c in everything.items() if Path(f"/proc/{p}").exists()
                and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}
        assert not left, left
        assert errors[-1] == "llm: server stopped", errors[-5:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
