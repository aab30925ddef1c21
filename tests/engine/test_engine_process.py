"""The engine in its own process: the offline LLM API, the async client, startup errors and a dying core."""
import asyncio
import os
import signal

import pytest

from engine import LLM, SamplingParams
from engine.async_client import AsyncEngineClient, EngineDeadError, EngineStartupError
from engine.config import EngineConfig


def test_offline_llm_generates_and_chats(default_gguf_path):
    with LLM(model=default_gguf_path, kv_cache_gib=0.1, max_model_len=512) as llm:
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
            outs = [o async for o in client.generate("ok", [504, 3575, 282], SamplingParams(max_tokens=4))]
            assert outs[-1].finish_reason == "length"
            # Then the core dies while requests wait on it.
            params = SamplingParams(max_tokens=400, ignore_eos=True)

            async def consume(rid):
                async for _ in client.generate(rid, [504, 3575, 282], params):
                    pass

            tasks = [asyncio.create_task(consume(f"r{i}")) for i in range(3)]
            await asyncio.sleep(1.0)
            os.kill(client._process.process.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
            assert all(isinstance(r, EngineDeadError) for r in results), results
            with pytest.raises(EngineDeadError):
                async for _ in client.generate("late", [1, 2, 3], params):
                    pass
        finally:
            await client.shutdown()

    asyncio.run(scenario())


def test_engine_pipe_closing_after_the_loop_is_quiet(tmp_path):
    """At shutdown the server's event loop may close before the engine's pipe does: the reader thread
    then ends quietly instead of raising 'Event loop is closed' from its thread."""
    class ClosedPipe:
        def recv(self):
            raise EOFError

    client = AsyncEngineClient(EngineConfig(model=str(tmp_path / "none.gguf")))
    client._process = ClosedPipe()
    loop = asyncio.new_event_loop()
    loop.close()
    client._loop = loop
    client._read_loop()   # returns; nothing raised
