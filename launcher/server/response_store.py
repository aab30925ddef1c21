"""Stored Responses (`store: true`): a bounded LRU in memory, optionally mirrored as JSON files so they outlive
a restart; background responses keep their running task here, so cancel can reach it."""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import orjson

log = logging.getLogger("llm.server")

RUNNING = ("queued", "in_progress")


@dataclass(slots=True)
class StoredResponse:
    response: dict                      # the Response object as GET /v1/responses/{id} answers it
    input_items: list[dict]             # this request's input items (GET .../input_items)
    history: list[dict] = field(default_factory=list)   # every item so far, outputs included (for continuation)
    task: asyncio.Task | None = None    # a background response's run, while it runs

    @property
    def id(self) -> str:
        return self.response["id"]

    @property
    def is_running(self) -> bool:
        return self.response["status"] in RUNNING


class ResponseStore:
    def __init__(self, max_responses: int, directory: Path | None = None):
        assert max_responses >= 1
        self.max_responses = max_responses
        self.directory = directory
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()
        if directory is not None:
            self._load(directory)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, response_id: str) -> StoredResponse | None:
        record = self._items.get(response_id)
        if record is not None:
            self._items.move_to_end(response_id)
        return record

    def put(self, record: StoredResponse) -> None:
        """Insert or update; past max_responses the least recently used finished ones go (running ones stay)."""
        self._items[record.id] = record
        self._items.move_to_end(record.id)
        self._write(record)
        excess = len(self) - self.max_responses
        if excess > 0:
            for old_id in [k for k, r in self._items.items() if not r.is_running and k != record.id][:excess]:
                self.delete(old_id)

    def delete(self, response_id: str) -> StoredResponse | None:
        record = self._items.pop(response_id, None)
        if record is not None and self.directory is not None:
            self._path(response_id).unlink(missing_ok=True)
        return record

    def _path(self, response_id: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{response_id}.json"

    def _write(self, record: StoredResponse) -> None:
        if self.directory is None or record.is_running:
            return   # NOTE: only finished responses are persisted: a restart cannot resume a run
        data = {"response": record.response, "input_items": record.input_items, "history": record.history}
        tmp = self._path(record.id).with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(data))
        tmp.replace(self._path(record.id))

    def _load(self, directory: Path) -> None:
        """The newest max_responses files (older ones are deleted, as the LRU would have evicted them)."""
        directory.mkdir(parents=True, exist_ok=True)
        files = sorted(directory.glob("resp_*.json"), key=lambda p: p.stat().st_mtime)
        for path in files[:-self.max_responses]:
            path.unlink(missing_ok=True)
        for path in files[-self.max_responses:]:
            try:
                data = orjson.loads(path.read_bytes())
                record = StoredResponse(data["response"], data["input_items"], data["history"])
            except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as e:
                log.warning("ignoring the stored response %s: %s", path, e)
                continue
            self._items[record.id] = record
