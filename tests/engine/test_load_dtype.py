"""The loader materialises parameters in the target dtype: no float32 copy of the weights on the device first."""
import torch

from engine.loader import ModelFiles, load_config, load_model
from tests.engine.helpers import tiny_hf_model


def test_parameters_are_materialised_in_the_target_dtype(tmp_path, monkeypatch):
    tiny_hf_model("llama3").save_pretrained(tmp_path)
    materialised: list[tuple[torch.dtype, int]] = []   # (dtype, bytes) of each parameter as to_empty made it
    to_empty = torch.nn.Module.to_empty

    def spy(module, *, device, recurse=True):
        out = to_empty(module, device=device, recurse=recurse)
        materialised.extend((p.dtype, p.numel() * p.element_size()) for p in out.parameters())
        return out

    monkeypatch.setattr(torch.nn.Module, "to_empty", spy)
    files = ModelFiles.at(tmp_path)
    model = load_model(files, load_config(files), torch.bfloat16, torch.device("cpu"), max_positions=64)
    assert materialised, "load_model materialises the meta model with to_empty"
    assert {dtype for dtype, _ in materialised} == {torch.bfloat16}, "a float32 copy was made first"
    final = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(n for _, n in materialised) == final
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
