"""Bad model files give one-line errors naming the file and the problem, never a traceback."""
import json
import subprocess
import sys

import pytest
import torch

from engine.loader import LoadError, ModelFiles, load_config, load_model, safetensors_files
from tests.engine.helpers import tiny_hf_model


@pytest.fixture()
def checkpoint(tmp_path):
    tiny_hf_model("qwen2").save_pretrained(tmp_path, max_shard_size="100KB")
    return tmp_path


def load_everything(path):
    files = ModelFiles.at(path)
    config = load_config(files)
    return load_model(files, config, torch.float32, torch.device("cpu"), max_positions=64)


def one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_a_good_checkpoint_loads(checkpoint):
    assert load_everything(checkpoint) is not None


def test_missing_path(tmp_path):
    with pytest.raises(LoadError) as err:
        ModelFiles.at(tmp_path / "nope")
    one_line(err, str(tmp_path / "nope"), "no such file")


def test_directory_without_model(tmp_path):
    with pytest.raises(LoadError) as err:
        ModelFiles.at(tmp_path)
    one_line(err, str(tmp_path), "config.json")


def test_missing_shard(checkpoint):
    shard = sorted(checkpoint.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(LoadError) as err:
        safetensors_files(checkpoint)
    one_line(err, shard.name, "not found")


def test_truncated_safetensors(checkpoint):
    shard = sorted(checkpoint.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(LoadError) as err:
        load_everything(checkpoint)
    one_line(err, shard.name, "truncated")


def test_unknown_architecture(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError) as err:
        load_everything(checkpoint)
    one_line(err, "config.json", "GPTNeoXForCausalLM", "unsupported architecture")


def test_config_with_missing_keys(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    del config["hidden_size"], config["num_hidden_layers"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError) as err:
        load_everything(checkpoint)
    one_line(err, "config.json", "hidden_size", "num_hidden_layers")


def test_checkpoint_lacking_a_tensor(checkpoint):
    from safetensors.torch import load_file, save_file
    shard = sorted(checkpoint.glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(dropped)
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError) as err:
        load_everything(checkpoint)
    one_line(err, str(checkpoint), "lacks")


def test_unsupported_gguf_quantization(tmp_path):
    import gguf
    import numpy as np
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    # IQ4_NL: blocks of 32 weights in 18 bytes; 4 rows of 4 blocks.
    writer.add_tensor("token_embd.weight", np.zeros((4, 18 * 4), dtype=np.uint8),
                      raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(LoadError) as err:
        load_config(ModelFiles.at(path))
    one_line(err, str(path), "IQ4_NL")


def test_the_cli_prints_one_line_not_a_traceback(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "serve", "--model", str(checkpoint),
                           "--port", "0", "--offline"], capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "GPTNeoXForCausalLM" in proc.stderr + proc.stdout
