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
