"""The upstream providers a server can route to (the gateway document's table): defaults per engine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Provider:
    engine: str
    default_base_url: str | None     # None: base_url must be given (or, for azure, AZURE_OPENAI_ENDPOINT)
    key_env: str | None              # where the API key is read from unless api_key_env says otherwise
    openai_compatible: bool          # requests are proxied as they are (anthropic and cohere only list)


PROVIDERS: dict[str, Provider] = {
    "openai": Provider("openai", "https://api.openai.com/v1", "OPENAI_API_KEY", True),
    "nim": Provider("nim", None, "NVIDIA_API_KEY", True),
    "vllm": Provider("vllm", None, None, True),
    "trt_llm": Provider("trt_llm", None, None, True),
    "anthropic": Provider("anthropic", "https://api.anthropic.com", "ANTHROPIC_API_KEY", False),
    "azure": Provider("azure", None, "AZURE_OPENAI_API_KEY", True),
    "cohere": Provider("cohere", "https://api.cohere.com", "COHERE_API_KEY", False),
    "custom": Provider("custom", None, None, True),
}
ALIASES = {"azure_openai": "azure"}
AZURE_DEFAULT_API_VERSION = "2024-06-01"


def provider(engine: str) -> Provider:
    """The table's entry for an engine name; a name it does not know is a custom OpenAI-compatible one."""
    return PROVIDERS.get(ALIASES.get(engine, engine), PROVIDERS["custom"])
