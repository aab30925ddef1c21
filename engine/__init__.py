"""The engine: token ids in, token ids out. `from engine import LLM, SamplingParams`."""
from engine.sampling_params import SamplingParams


def __getattr__(name: str):
    # LLM pulls in torch; keep `import engine` light for the launcher.
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams"]
