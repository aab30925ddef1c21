"""The engine's messages read off a non-blocking pipe, so the server's event loop can wait on the pipe itself.

The engine process writes with multiprocessing.Connection.send: a frame is a 4-byte big-endian signed length
and the pickle (a length over 2**31 - 1 is -1 then an 8-byte unsigned one). FrameReader decodes whatever
bytes have arrived into the whole messages among them and keeps the rest for the next read.
"""
from __future__ import annotations

import os
import pickle
import struct

READ_BYTES = 1 << 20   # one os.read; a larger message takes several


class FrameReader:
    def __init__(self, fd: int):
        """fd: the read end of the pipe, already non-blocking."""
        self.fd = fd
        self._buffer = bytearray()

    def read(self) -> list:
        """The messages that have fully arrived, in order (possibly none); EOFError once the writer has
        closed its end and no whole message is left."""
        while True:
            try:
                chunk = os.read(self.fd, READ_BYTES)
            except BlockingIOError:
                break
            if not chunk:
                messages = self._messages()
                if messages:
                    return messages   # EOF is raised on the next read
                raise EOFError("the engine's pipe closed")
            self._buffer += chunk
            if len(chunk) < READ_BYTES:
                break   # a short read: the pipe is empty for now
        return self._messages()

    def _messages(self) -> list:
        messages, buf, start = [], self._buffer, 0
        with memoryview(buf) as view:   # released before the buffer shrinks (a bytearray with views cannot)
            while len(buf) - start >= 4:
                (size,) = struct.unpack_from("!i", buf, start)
                header = 4
                if size == -1:
                    if len(buf) - start < 12:
                        break
                    (size,) = struct.unpack_from("!Q", buf, start + 4)
                    header = 12
                end = start + header + size
                if len(buf) < end:
                    break
                with view[start + header:end] as frame:
                    messages.append(pickle.loads(frame))
                start = end
        if start:
            del buf[:start]
        return messages
