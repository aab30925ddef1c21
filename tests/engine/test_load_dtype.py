"""The loader materialises parameters in the target dtype: no float32 copy of the weights on the device first."""
import torch

import engine.loader
from engine.loader import ModelFiles, load_config, load_model
from tests.engine.helpers import tiny_hf_model


def test_parameters_are_materialised_in_the_target_dtype(tmp_path, monkeypatch):
    tiny_hf_model("llama3").save_pretrained(tmp_path)
    materialised: list[tuple[torch.dtype, int]] = []   # (dtype, bytes) of each parameter as materialize made it
    materialize = engine.loader.materialize

    def spy(module, dtype, device):
        out = materialize(module, dtype, device)
        materialised.extend((p.dtype, p.numel() * p.element_size()) for p in out.parameters())
        return out

    monkeypatch.setattr(engine.loader, "materialize", spy)
    files = ModelFiles.at(tmp_path)
    model = load_model(files, load_config(files), torch.bfloat16, torch.device("cpu"), max_positions=64)
    assert materialised, "load_model materialises the meta model with engine.loader.materialize"
    assert {dtype for dtype, _ in materialised} == {torch.bfloat16}, "a float32 copy was made first"
    final = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(n for _, n in materialised) == final
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_materialize_keeps_shared_tensors_shared_and_integer_buffers_integer():
    with torch.device("meta"):
        a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
        b.weight = a.weight                                   # tied, as an LM head may be
        a.register_buffer("ids", torch.arange(5))
        b.register_parameter("bias", None)
    model = engine.loader.materialize(torch.nn.Sequential(a, b), torch.bfloat16, torch.device("cpu"))
    assert model[0].weight is model[1].weight and model[0].weight.dtype == torch.bfloat16
    assert model[0].weight.device.type == "cpu" and model[1].bias is None
    assert model[0].ids.dtype == torch.int64 and not model[0].ids.is_meta
