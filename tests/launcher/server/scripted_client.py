"""ScriptedClient: an in-process EngineClient for handler-level tests; subclasses script what it answers."""
from engine.messages import EngineInfo, EngineStats
from engine.protocol import EngineClient


class ScriptedClient(EngineClient):
    """Ready at once with the given info; generates, embeds and stops nothing unless a subclass says so."""
    phase = "ready"
    error = None

    def __init__(self, info: EngineInfo):
        self._info = info

    @property
    def info(self):
        return self._info

    async def start(self, on_phase=None):
        return self._info

    async def shutdown(self):
        pass

    async def generate(self, request_id, prompt_token_ids, params, *, images=()):
        raise NotImplementedError
        yield   # an async generator, as the interface's callers iterate it

    def abort(self, request_id):
        pass

    def stop_sample(self, request_id, index):
        pass

    async def embed(self, request_id, inputs, pooling=None, normalize=True, *, task="embed", token_type_ids=None):
        raise NotImplementedError

    async def stats(self):
        return EngineStats()
