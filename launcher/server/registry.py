"""ModelRegistry: every served name -> the model behind it; the one way handlers reach a model."""
from __future__ import annotations

import asyncio

from launcher.server.errors import model_not_found
from launcher.server.served_model import ServedModel


class ModelRegistry:
    def __init__(self, models: list[ServedModel]):
        self.models = list(models)
        self._by_name: dict[str, ServedModel] = {}
        for model in self.models:
            for name in model.names:
                other = self._by_name.setdefault(name, model)
                assert other is model, f"two models claim the served name {name!r}"

    @property
    def names(self) -> list[str]:
        """Every served name and alias, in the order the models were given."""
        return list(self._by_name)

    def get(self, name: object) -> ServedModel:
        """The model a request's `model` names; 404 model_not_found for anything else."""
        model = self._by_name.get(name) if isinstance(name, str) else None
        if model is None:
            raise model_not_found(name)
        return model

    def ready(self, name: object) -> ServedModel:
        """The named model, once it can serve (503 with its startup phase until then)."""
        model = self.get(name)
        model.check_ready()
        return model

    @property
    def primary(self) -> ServedModel:
        return self.models[0]

    @property
    def is_ready(self) -> bool:
        return all(m.is_ready for m in self.models)

    @property
    def phase(self) -> str:
        """The first model's phase that is not 'ready' (the one startup is waiting on), else 'ready'."""
        return next((m.phase for m in self.models if not m.is_ready), "ready")

    @property
    def error(self) -> str | None:
        return next((m.client.error for m in self.models if m.client.error is not None), None)

    async def start(self) -> None:
        await asyncio.gather(*(m.start() for m in self.models))

    async def shutdown(self) -> None:
        await asyncio.gather(*(m.client.shutdown() for m in self.models))
