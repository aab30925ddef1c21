"""`llm bench`: a load generator for OpenAI-compatible servers and offline engine benchmarks."""


class BenchError(RuntimeError):
    """A benchmark cannot run or finish; the message says why (shown without a traceback)."""
