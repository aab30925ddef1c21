"""The catalogue from the command line: `llm list` shows its rows (filters, JSON), `llm sync --models` refreshes
it from a profile's upstreams (loopback providers in their documented shapes) and says what changed."""
from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner

from launcher.catalog import SHIPPED
from launcher.cli import main
from tests.launcher.server.fake_upstreams import FakeProviders


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for var in ("MAIN_MODEL_ENGINE", "MAIN_MODEL_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def fake():
    providers = FakeProviders()
    yield providers
    providers.close()


def invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_list_shows_the_catalogue_with_its_prices(home):
    data = json.loads(invoke("list", "--json").output)
    rows = {(r["provider"], r["id"]): r for r in data["catalog"]}
    shipped = json.loads(SHIPPED.read_text())
    assert len(rows) == len(shipped["models"]) and shipped["taken"]
    assert rows[("openai", "gpt-4o")]["pricing"] == {"input": 2.5, "output": 10.0}
    assert rows[("anthropic", "claude-3-5-haiku-20241022")]["context_window"] == 200000
    only = json.loads(invoke("list", "--json", "--provider", "anthropic").output)
    assert only["profiles"] == [] and only["models"] == []
    assert {r["provider"] for r in only["catalog"]} == {"anthropic"}
    embed = json.loads(invoke("list", "--json", "--capability", "embedding").output)["catalog"]
    assert embed and all("embedding" in r["capabilities"] for r in embed)
    assert json.loads(invoke("list", "--json", "--provider", "hf").output)["catalog"] == []
    table = invoke("list").output
    assert "Catalogue (prices per 1M tokens, USD, as of" in table and "gpt-4o" in table and "2.5/10" in table


def test_sync_refreshes_from_the_upstreams_and_says_what_changed(home, fake):
    profile = home / "up.toml"
    profile.write_text(f"""
[[upstreams]]
name = "fake"
engine = "custom"
base_url = "{fake.url}/openai/v1"

[[upstreams]]
name = "cohere"
engine = "cohere"
base_url = "{fake.url}/cohere"
""")
    first = invoke("sync", "--models", str(profile))
    assert first.exit_code == 0, first.output
    assert "+ fake/ok" in first.output and "~ cohere/command-r-08-2024: capabilities" in first.output
    stored = json.loads((home / "home" / "catalog.json").read_text())
    assert {m["id"] for m in stored["models"]} >= {"ok", "slow", "command-r-08-2024", "embed-english-v3.0"}
    assert "no changes" in invoke("sync", "--models", str(profile)).output
    rows = {r["id"]: r for r in json.loads(invoke("list", "--json", "--provider", "cohere").output)["catalog"]}
    # what the upstream reported (its endpoints) over the shipped facts, which keep the prices
    assert rows["command-r-08-2024"]["capabilities"] == ["completion", "chat"]
    assert rows["command-r-08-2024"]["pricing"] == {"input": 0.15, "output": 0.6}


def test_sync_needs_upstreams_and_reports_unreachable_ones(home):
    assert "no upstreams to sync from" in invoke("sync", "--models").output
    assert "say what to sync" in CliRunner().invoke(main, ["sync"]).output
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    profile = home / "gone.toml"
    profile.write_text(f'[[upstreams]]\nname = "gone"\nengine = "vllm"\nbase_url = "http://127.0.0.1:{port}/v1"\n')
    result = CliRunner().invoke(main, ["sync", "--models", str(profile)])
    assert result.exit_code == 1 and "! gone:" in result.output
