"""model.tokenizer in a profile: the server tokenizes with the override, not the model's own tokenizer."""
import shutil

from launcher.server.served_model import load_server_tokenizer


def test_tokenizer_only_directory_and_model_paths(tmp_path, minilm_dir, default_gguf_path):
    override = tmp_path / "tok"
    override.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(f"{minilm_dir}/{name}", override / name)
    tok = load_server_tokenizer(str(override))
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.vocab_size == load_server_tokenizer(minilm_dir).vocab_size == 30522
    assert load_server_tokenizer(default_gguf_path).vocab_size == 49152
