"""FrameReader: the engine's messages, as multiprocessing.Connection frames them, read off a non-blocking pipe
in whatever pieces the bytes arrive."""
import os
import pickle
import struct
import threading
from multiprocessing.connection import Connection

import pytest

from engine.messages import EngineStats, StepOutputs, TokenOutput
from engine.pipe_frames import FrameReader


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    writer = Connection(w, readable=False)
    yield FrameReader(r), writer
    if not writer.closed:
        writer.close()
    os.close(r)


def _read_all(reader: FrameReader, count: int) -> list:
    got = []
    while len(got) < count:
        got += reader.read()
    return got


def test_messages_of_every_size_come_back_whole_and_in_order(pipe):
    reader, writer = pipe
    assert reader.read() == []   # nothing sent yet: no message, no error
    messages = [StepOutputs([TokenOutput("r", 0, [7])], EngineStats()), "x" * 16383, "y" * 16385, list(range(300_000)), None]
    # the large one (~1.5 MB) is more than a pipe holds: it is written while the reader takes it in pieces
    sender = threading.Thread(target=lambda: [writer.send(m) for m in messages])
    sender.start()
    got = _read_all(reader, len(messages))
    sender.join()
    assert got == messages


def test_a_frame_split_anywhere_waits_for_its_rest(pipe):
    reader, writer = pipe
    payload = pickle.dumps({"a": 1})
    whole = struct.pack("!i", len(payload)) + payload
    for cut in range(1, len(whole)):
        os.write(writer.fileno(), whole[:cut])
        assert reader.read() == []
        os.write(writer.fileno(), whole[cut:])
        assert reader.read() == [{"a": 1}]


def test_the_long_form_length_is_read(pipe):
    # Connection writes a length over 2**31 - 1 as -1 and then 8 bytes; the reader takes it at any size
    reader, writer = pipe
    payload = pickle.dumps("long form")
    os.write(writer.fileno(), struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload)
    assert reader.read() == ["long form"]


def test_eof_comes_after_the_last_whole_message(pipe):
    reader, writer = pipe
    writer.send("last")
    writer.close()
    assert reader.read() == ["last"]
    with pytest.raises(EOFError):
        reader.read()


def test_the_messages_of_every_step_come_back_equal_through_their_fields():
    """StepOutputs and what it carries pickle as their fields (engine/fast_pickle.py): equal, same types."""
    from engine.messages import TokenLogprob, TranscriptionOutput, TranscriptionSegment
    from engine.stats import SchedulerStats
    segment = TranscriptionSegment(0, 0.0, 1.5, [7, 8], -0.25, 0.01, 0.0)
    step = StepOutputs([TokenOutput("r-1", 2, [5, 6], [TokenLogprob(5, -0.5, [(5, -0.5), (9, -1.25)])],
                                    finish_reason="length", num_prompt_tokens=11),
                        TokenOutput("r-2", 0, []),
                        TranscriptionOutput("t-1", [7, 8], [segment], finished=True)],
                       EngineStats(SchedulerStats(1, 2, 100, 30, 64, 32, 1, 500, 77), 3, 1, 0))
    for message in (step, SchedulerStats(), EngineStats(), TokenLogprob(1, None), segment):
        back = pickle.loads(pickle.dumps(message))
        assert back == message and type(back) is type(message)
