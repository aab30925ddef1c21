"""The engine in its own process: the offline LLM API, the async client, startup errors and a dying core."""
import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.async_client import AsyncEngineClient, EngineDeadError, EngineStartupError
from engine.config import EngineConfig
from engine.validation import InvalidRequest

REPO = Path(__file__).resolve().parents[2]


def test_offline_llm_generates_and_chats(default_gguf_path):
    # The exact path (float32 activations): with the int8 default this 135M model's first answer token is a
    # near tie (p ~ 0.15 for the top few either way) and it answers "L'Etoile, ...", as llama.cpp's server
    # does on the same file; the exact path answers "The capital of France is Paris."
    with LLM(model=default_gguf_path, kv_cache_gib=0.1, max_model_len=512, cpu_quantized_activations=False) as llm:
        assert llm.info.max_model_len == 512 and llm.info.device == "cpu"
        [chat] = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                          SamplingParams(temperature=0, max_tokens=32))
        assert "Paris" in chat.outputs[0].text and chat.outputs[0].finish_reason == "stop"
        outs = llm.generate(["The quick brown fox", [504, 3575, 282]],
                            SamplingParams(temperature=0, max_tokens=8, logprobs=0))
        assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8]
        assert outs[0].outputs[0].text and outs[0].outputs[0].finish_reason == "length"
        assert len(outs[1].outputs[0].logprobs) == 8 and all(lp <= 0 for lp in outs[1].outputs[0].logprobs)


def test_startup_error_is_one_line(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")

    async def start():
        client = AsyncEngineClient(EngineConfig(model=str(bad)))
        try:
            await client.start()
        finally:
            await client.shutdown()

    with pytest.raises(EngineStartupError) as err:
        asyncio.run(start())
    message = str(err.value)
    assert str(bad) in message and "\n" not in message


def test_a_dead_engine_fails_waiting_requests_instead_of_hanging(default_gguf_path):
    async def scenario():
        client = AsyncEngineClient(EngineConfig(model=default_gguf_path, kv_cache_gib=0.1, max_model_len=512))
        await client.start()
        try:
            # One request completes normally.
            once = SamplingParams(max_tokens=4, ignore_eos=True)   # never ended early by a sampled eos
            outs = [o async for o in client.generate("ok", [504, 3575, 282], once)]
            assert outs[-1].finish_reason == "length"
            # Then the core dies while requests wait on it.
            params = SamplingParams(max_tokens=400, ignore_eos=True)

            async def consume(rid):
                async for _ in client.generate(rid, [504, 3575, 282], params):
                    pass

            tasks = [asyncio.create_task(consume(f"r{i}")) for i in range(3)]
            await asyncio.sleep(1.0)
            os.kill(client._process.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
            assert all(isinstance(r, EngineDeadError) for r in results), results
            with pytest.raises(EngineDeadError):
                async for _ in client.generate("late", [1, 2, 3], params):
                    pass
        finally:
            await client.shutdown()

    asyncio.run(scenario())


def _readme_offline_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The offline API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_offline_example_runs_as_a_plain_script(default_gguf_path, tmp_path):
    """Saved as ex.py and run with `python ex.py` from another folder: no __main__ guard is needed,
    because the engine process never re-imports the user's script."""
    script = tmp_path / "ex.py"
    script.write_text(_readme_offline_example())
    assert "__main__" not in script.read_text()
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # it prints the completion's text and its 16 token ids, then a chat answer
    text, ids, chat = re.fullmatch(r"(.+?) (\[\d+(?:, \d+){15}\])\n(.*)", done.stdout, re.S).groups()
    assert text.strip() and chat.strip(), done.stdout
    assert "Traceback" not in done.stderr and "bootstrapping" not in done.stderr


def test_offline_llm_honours_stop_strings_and_refuses_what_cannot_fit(default_gguf_path):
    with LLM(model=default_gguf_path, kv_cache_gib=0.1, max_model_len=256) as llm:
        [free] = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))
        word = free.outputs[0].text.split()[0]
        [stopped] = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12,
                                                                            stop=[word]))
        out = stopped.outputs[0]
        assert out.finish_reason == "stop" and word not in out.text and len(out.token_ids) < 12
        with pytest.raises(InvalidRequest, match="maximum context length is 256"):
            llm.generate([list(range(100, 350))], SamplingParams(max_tokens=10))
        assert llm.generate("Hi", SamplingParams(temperature=0, max_tokens=2))[0].outputs[0].token_ids


def test_offline_startup_failure_is_one_line(default_gguf_path):
    with pytest.raises(RuntimeError) as err:
        LLM(model=default_gguf_path, device="tpu")
    assert "unknown device 'tpu'" in str(err.value) and "\n" not in str(err.value)
