"""LLaVA (CLIP and SigLIP towers) against HF transformers on random checkpoints: preprocessing, image
features, weight naming schemes, and greedy generation through the engine core."""
import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.core import EngineCore
from engine.loader import LoadError, ModelFiles, load_config, load_model
from engine.messages import AddRequest
from engine.multimodal import expand_image_tokens
from engine.sampling_params import SamplingParams
from engine.vision import load_image_processor
from tests.engine.helpers import collect, engine_config
from tests.engine.vision_checkpoints import IMAGE_TOKEN_ID, sample_images, save_tiny_llava

TOWERS = ["clip", "siglip"]
NUM_TOKENS = {"clip": 16, "siglip": 16, "clip-full": 17}


def _checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"llava_{request.param}")
    hf, processor = save_tiny_llava(path, request.param)
    return request.param, hf, processor, path


checkpoint = pytest.fixture(scope="module", params=TOWERS)(_checkpoint)
# The variants only preprocessing and features are checked on (generation runs the same code).
any_checkpoint = pytest.fixture(scope="module", params=TOWERS + ["clip-full"])(_checkpoint)


def _ours(path):
    files = ModelFiles.at(path)
    config = load_config(files)
    return config, load_model(files, config, torch.float32, torch.device("cpu"), max_positions=512)


def test_pixels_match_hf_processor(any_checkpoint):
    tower, _, hf_processor, path = any_checkpoint
    config = load_config(ModelFiles.at(path))
    ours = load_image_processor(path, config)
    assert ours.image_token_id == IMAGE_TOKEN_ID
    for image in sample_images():
        got = ours.preprocess(image)
        ref = hf_processor(images=image, return_tensors="np")["pixel_values"][0]
        assert got.pixel_values.dtype == np.float32 and got.pixel_values.shape == ref.shape == (3, 56, 56)
        assert np.abs(got.pixel_values - ref).max() <= 1e-5, image.size
        assert got.grid_thw is None and got.num_tokens == NUM_TOKENS[tower]


def test_image_features_match_hf(any_checkpoint):
    tower, hf, _, path = any_checkpoint
    config, ours = _ours(path)
    processor = load_image_processor(path, config)
    images = [processor.preprocess(i) for i in sample_images()]
    _, placed = expand_image_tokens([IMAGE_TOKEN_ID] * len(images), images, IMAGE_TOKEN_ID)
    got = ours.encode_images(placed)
    with torch.no_grad():
        pixels = torch.from_numpy(np.stack([i.pixel_values for i in images]))
        ref = hf.model.get_image_features(pixel_values=pixels).pooler_output
    assert len(got) == len(ref) == len(images)
    for g, r in zip(got, ref):
        assert g.shape == r.shape == (NUM_TOKENS[tower], config.hidden_size)
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    # One image alone gives the same rows as in the batch.
    torch.testing.assert_close(ours.encode_images(placed[2:3])[0], got[2], rtol=1e-5, atol=1e-5)


# The tensor names the other LLaVA checkpoint layouts use, from the names transformers 5.x saves
# (language_model.model.*, language_model.lm_head, vision_tower.*, multi_modal_projector.*).
def _hub_name(name: str) -> str:       # llava-hf/* on the hub: the tower under vision_model
    return name.replace("vision_tower.", "vision_tower.vision_model.", 1)


def _v4_name(name: str) -> str:        # transformers 4.5x save_pretrained
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if name.startswith(old):
            return new + name.removeprefix(old)
    raise AssertionError(name)


@pytest.mark.parametrize("rename", [_hub_name, _v4_name])
def test_other_naming_schemes_load_alike(checkpoint, tmp_path, rename):
    _, _, _, path = checkpoint
    tensors = load_file(path / "model.safetensors")
    assert any(k.startswith("language_model.model.") for k in tensors)   # what this transformers writes
    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_text((path / name).read_text())
    save_file({rename(k): v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    _, reference = _ours(path)
    _, renamed = _ours(tmp_path)
    want = dict(reference.named_parameters())
    for name, param in renamed.named_parameters():
        assert torch.equal(param, want[name]), name


def test_missing_vision_tensor_is_named(checkpoint, tmp_path):
    _, _, _, path = checkpoint
    tensors = load_file(path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    dropped = "vision_tower.encoder.layers.0.self_attn.k_proj.bias"
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match="k_proj.bias"):
        _ours(tmp_path)
    del tensors["multi_modal_projector.linear_1.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match="multi_modal_projector.linear_1.weight"):
        _ours(tmp_path)


def test_image_processor_config_errors(checkpoint, tmp_path):
    _, _, _, path = checkpoint
    config = load_config(ModelFiles.at(path))
    with pytest.raises(ValueError, match="preprocessor_config.json: file not found"):
        load_image_processor(tmp_path, config)
    raw = json.loads((path / "preprocessor_config.json").read_text())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**raw, "image_processor_type": "NopeProcessor"}))
    with pytest.raises(ValueError, match="unsupported image_processor_type 'NopeProcessor'"):
        load_image_processor(tmp_path, config)
    too_big = {**raw, "image_processor_type": "CLIPImageProcessorFast",
               "crop_size": {"height": 64, "width": 64}, "size": {"shortest_edge": 64}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(too_big))
    with pytest.raises(ValueError, match="vision tower takes 56x56"):
        load_image_processor(tmp_path, config)


def _prompts(processor, num: int = 16):
    """num prompts of random text around one or two images each (placeholders expanded)."""
    gen = torch.Generator().manual_seed(5)
    images = [processor.preprocess(i) for i in sample_images()]
    prompts = []
    for k in range(num):
        chosen = [images[k % len(images)]] + ([images[(3 * k + 1) % len(images)]] if k % 3 == 0 else [])
        tokens: list[int] = []
        for _ in chosen:
            tokens += torch.randint(3, 500, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
            tokens.append(IMAGE_TOKEN_ID)
        tokens += torch.randint(3, 500, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        prompts.append(expand_image_tokens(tokens, chosen, IMAGE_TOKEN_ID))
    return prompts


def _run(core, prompts, params) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    for i, (token_ids, images) in enumerate(prompts):
        assert not core.add_request(AddRequest(f"r{i}", token_ids, params, time.monotonic(), images=tuple(images)))
        outputs[f"r{i}"] = []
    while core.has_work():
        for out in core.step():
            collect(outputs, out)
    return outputs


def test_greedy_tokens_match_hf_generate(checkpoint):
    _, hf, _, path = checkpoint
    core = EngineCore(engine_config(path, block_size=8, max_num_batched_tokens=64, max_num_seqs=16))
    processor = load_image_processor(path, core.model_config)
    prompts = _prompts(processor)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    together = _run(core, prompts, params)
    refs = []
    for token_ids, images in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([token_ids]), attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                              pixel_values=torch.from_numpy(np.stack([i.pixel_values for i in images])),
                              max_new_tokens=12, min_new_tokens=12, do_sample=False)
        refs.append(out[0, len(token_ids):].tolist())
    for i, ref in enumerate(refs):
        assert together[f"r{i}"] == ref, f"prompt {i} (in a batch of {len(prompts)})"
    # Again on the same engine: prompt blocks from the prefix cache, image embeddings from the encoder cache
    again = _run(core, prompts, params)
    assert again == together
    # Each alone, on a fresh engine (no prefix or encoder cache from the batch run)
    core = EngineCore(engine_config(path, block_size=8, max_num_batched_tokens=64, max_num_seqs=16))
    for i, prompt in enumerate(prompts):
        assert _run(core, [prompt], params)["r0"] == refs[i], f"prompt {i} alone"


def test_sparse_hub_config_takes_hf_defaults():
    """llava-hf/llava-1.5-7b-hf's vision_config lists only what differs from CLIPVisionConfig's defaults."""
    from engine.models.clip import VisionTowerConfig
    from engine.vision.clip_processor import llava_image_geometry
    vision_config = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                     "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                     "patch_size": 14, "projection_dim": 768, "vocab_size": 32000}
    tower = VisionTowerConfig.from_hf_dict(vision_config, "config.json")
    assert (tower.hidden_act, tower.layer_norm_eps, tower.num_channels) == ("quick_gelu", 1e-5, 3)
    assert tower.num_positions == 577
    assert llava_image_geometry({"vision_config": vision_config}) == (336, 576)   # HF's image_seq_length
    siglip = VisionTowerConfig.from_hf_dict({"model_type": "siglip_vision_model"}, "config.json")
    assert (siglip.hidden_act, siglip.layer_norm_eps, siglip.num_positions) == ("gelu_pytorch_tanh", 1e-6, 196)


def test_image_processing_imports_no_torch():
    """The server process preprocesses images; it must not pay torch's import."""
    import subprocess
    import sys
    code = "import sys, engine.vision, engine.vision.clip_processor; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
