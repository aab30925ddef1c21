"""merge_outputs under a request timeout: a cancel of the task reading it always ends that task (a background
response's cancel aborts its engine request), even when it lands as an output arrives."""
import asyncio

import pytest

from launcher.server.errors import APIError
from launcher.server.generation import merge_outputs


async def _outputs(pause_s: float = 0.0):
    """An engine stream that always has the next output ready at once (or after pause_s)."""
    i = 0
    while True:
        await asyncio.sleep(pause_s)
        i += 1
        yield i


def test_a_cancel_is_never_lost_to_an_arriving_output():
    async def first_lost() -> int | None:
        for trial in range(200):
            async def read() -> None:
                async for _ in merge_outputs([_outputs()], timeout_s=100.0):
                    pass
            task = asyncio.create_task(read())
            for _ in range(trial % 7 + 3):   # cancel at every phase of an output's arrival
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            if not (task.done() and task.cancelled()):   # the stream never ends: a lost cancel keeps it reading
                while not task.done():
                    task.cancel()
                    await asyncio.wait({task}, timeout=0.1)
                return trial
        return None
    assert asyncio.run(first_lost()) is None


def test_the_timeout_still_stops_the_stream():
    async def read() -> None:
        async for _ in merge_outputs([_outputs(pause_s=0.01)], timeout_s=0.05):
            pass
    with pytest.raises(APIError) as e:
        asyncio.run(read())
    assert e.value.status == 408
