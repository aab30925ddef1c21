"""Qwen2-VL / Qwen2.5-VL against HF transformers on tiny random checkpoints: pixels, image features,
M-RoPE positions, and greedy tokens through the engine."""
import time

import numpy as np
import pytest
import torch

from engine.config import ModelConfig
from engine.core import EngineCore
from engine.loader import LoadError, ModelFiles, load_config, load_model
from engine.models.qwen2_vl_vision import VisionConfig
from engine.messages import AddRequest
from engine.multimodal import ImageInput, expand_image_tokens
from engine.sampling_params import SamplingParams
from engine.vision import load_image_processor
from engine.vision.qwen2_vl_processor import Qwen2VLImageProcessor
from tests.engine.helpers import collect, engine_config
from tests.engine.qwen2_vl_checkpoints import (IMAGE_TOKEN, KINDS, VISION_END, VISION_START, hf_image_processor,
                                               sample_images, save_checkpoint, tiny_hf_vl_model)

NUM_NEW_TOKENS = 12


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    model = tiny_hf_vl_model(request.param)
    path = save_checkpoint(model, tmp_path_factory.mktemp(request.param))
    return request.param, model, path


@pytest.fixture(scope="module")
def ours(checkpoint):
    _, _, path = checkpoint
    files = ModelFiles.at(path)
    config = load_config(files)
    model = load_model(files, config, torch.float32, torch.device("cpu"), max_positions=512)
    processor = load_image_processor(path, config)
    assert isinstance(processor, Qwen2VLImageProcessor)
    return model, processor


def _prompt(rng: np.random.Generator, images, processor) -> tuple[list[int], list[ImageInput]]:
    """Random text around <|vision_start|><|image_pad|><|vision_end|> per image, placeholders expanded."""
    ids = rng.integers(3, 500, rng.integers(2, 9)).tolist()
    for _ in images:
        ids += [VISION_START, IMAGE_TOKEN, VISION_END] + rng.integers(3, 500, rng.integers(1, 7)).tolist()
    return expand_image_tokens(ids, [processor.preprocess(im) for im in images], IMAGE_TOKEN)


def _hf_inputs(ids: list[int], placed: list[ImageInput]) -> dict:
    input_ids = torch.tensor([ids])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == IMAGE_TOKEN).int(),
                pixel_values=torch.from_numpy(np.concatenate([p.pixel_values for p in placed])),
                image_grid_thw=torch.tensor([p.grid_thw for p in placed]))


def test_pixels_match_hf_processor(ours):
    _, processor = ours
    hf = hf_image_processor()
    for image in sample_images():
        got = processor.preprocess(image)
        ref = hf(images=[image], return_tensors="np")
        assert got.grid_thw == tuple(ref["image_grid_thw"][0].tolist())
        assert got.num_tokens == np.prod(got.grid_thw) // 4
        assert got.pixel_values.dtype == np.float32 and got.pixel_values.shape == ref["pixel_values"].shape
        np.testing.assert_allclose(got.pixel_values, ref["pixel_values"], rtol=0, atol=1e-5)
    # a transparent image composites onto white, as HF's does
    rgba = sample_images()[0].convert("RGBA")
    rgba.putalpha(90)
    np.testing.assert_allclose(processor.preprocess(rgba).pixel_values,
                               hf(images=[rgba], return_tensors="np")["pixel_values"], rtol=0, atol=1e-5)


def test_image_features_match_hf(checkpoint, ours):
    _, hf, _ = checkpoint
    model, processor = ours
    images = [processor.preprocess(im) for im in sample_images()]
    placed = [ImageInput(p.content_hash, p.pixel_values, p.grid_thw, 0, p.num_tokens) for p in images]
    got = model.encode_images(placed)   # all five in one vision forward
    with torch.no_grad():
        ref = hf.model.get_image_features(torch.from_numpy(np.concatenate([p.pixel_values for p in images])),
                                          torch.tensor([p.grid_thw for p in images])).pooler_output
    assert [g.shape for g in got] == [r.shape for r in ref]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    # alone, an image encodes the same as beside others (attention stays inside it)
    torch.testing.assert_close(model.encode_images(placed[1:2])[0], got[1], rtol=1e-5, atol=1e-5)


def test_mrope_positions_match_hf(checkpoint, ours):
    _, hf, _ = checkpoint
    model, processor = ours
    rng = np.random.default_rng(4)
    images = sample_images()
    for chosen in ([images[0]], [images[3]], [images[1], images[4]], [images[2], images[0]]):
        ids, placed = _prompt(rng, chosen, processor)
        got, delta = model.prompt_rope_positions(ids, tuple(placed))
        inputs = _hf_inputs(ids, placed)
        ref, ref_delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                 image_grid_thw=inputs["image_grid_thw"],
                                                 attention_mask=inputs["attention_mask"])
        assert got.dtype == np.int64 and got.shape == (3, len(ids))
        np.testing.assert_array_equal(got, ref[:, 0].numpy())
        assert delta == ref_delta.item()
    # text only: plain positions
    got, delta = model.prompt_rope_positions([5, 6, 7], ())
    np.testing.assert_array_equal(got, np.tile(np.arange(3), (3, 1)))
    assert delta == 0


def test_prompt_logprobs_match_hf(checkpoint, ours):
    """Every prompt position's logits (through the M-RoPE table and the image embeddings) against HF's."""
    _, hf, path = checkpoint
    _, processor = ours
    images = sample_images()
    ids, placed = _prompt(np.random.default_rng(5), [images[1], images[4]], processor)
    core = EngineCore(engine_config(path, block_size=8, max_num_batched_tokens=24, max_num_seqs=4))
    core.add_request(AddRequest("p", ids, SamplingParams(max_tokens=1, prompt_logprobs=2), time.monotonic(),
                                images=tuple(placed)))
    got = None
    while core.has_work():
        for out in core.step():
            got = out.prompt_logprobs if out.prompt_logprobs is not None else got
    with torch.no_grad():
        ref = torch.log_softmax(hf(**_hf_inputs(ids, placed)).logits[0].float(), dim=-1)
    assert got is not None and len(got) == len(ids)
    for t in range(1, len(ids)):
        assert abs(got[t].logprob - ref[t - 1, ids[t]].item()) < 1e-4, t


def _run(core, requests: list[tuple[list[int], list[ImageInput]]], params) -> list[list[int]]:
    outputs: dict[str, list[int]] = {}
    stamp = time.monotonic_ns()
    rids = [f"r{stamp}-{i}" for i in range(len(requests))]
    for rid, (ids, placed) in zip(rids, requests):
        assert not core.add_request(AddRequest(rid, ids, params, time.monotonic(), images=tuple(placed)))
        outputs[rid] = []
    while core.has_work():
        for out in core.step():
            collect(outputs, out)
    return [outputs[rid] for rid in rids]


def test_greedy_tokens_match_hf(checkpoint, ours):
    kind, hf, path = checkpoint
    _, processor = ours
    rng = np.random.default_rng(7)
    images = sample_images()
    requests = []
    for i in range(16):
        chosen = [images[j] for j in rng.choice(len(images), 1 + i % 2, replace=False)]
        requests.append(_prompt(rng, chosen, processor))
    refs = []
    for ids, placed in requests:
        with torch.no_grad():
            out = hf.generate(**_hf_inputs(ids, placed), max_new_tokens=NUM_NEW_TOKENS,
                              min_new_tokens=NUM_NEW_TOKENS, do_sample=False)
        refs.append(out[0, len(ids):].tolist())
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    # small blocks and chunks: prefills cut through images, and the shared images' blocks are prefix-cached
    core = EngineCore(engine_config(path, block_size=8, max_num_batched_tokens=32, max_num_seqs=16))
    alone = [_run(core, [r], params)[0] for r in requests]
    together = _run(core, requests, params)
    for i, ref in enumerate(refs):
        assert alone[i] == ref, f"{kind} prompt {i} alone"
        assert together[i] == ref, f"{kind} prompt {i} in the batch of 16"


def _module_names(name: str) -> str:
    """A hub tensor name as transformers >= 4.52 names its modules (model.language_model.*, model.visual.*)."""
    if name.startswith("visual."):
        return "model." + name
    return name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name


def test_loads_module_names_and_names_a_missing_tensor(checkpoint, ours, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    _, _, path = checkpoint
    model, processor = ours
    tensors = load_file(path / "model.safetensors")
    assert any(k.startswith("visual.") for k in tensors) and any(k.startswith("model.layers.") for k in tensors)
    shutil.copy(path / "config.json", tmp_path / "config.json")
    save_file({_module_names(k): v for k, v in tensors.items()}, tmp_path / "model.safetensors")
    files = ModelFiles.at(tmp_path)
    other = load_model(files, load_config(files), torch.float32, torch.device("cpu"), max_positions=512)
    theirs = dict(other.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, theirs[name]), name
    missing = "model.visual.blocks.1.attn.qkv.bias"
    save_file({_module_names(k): v for k, v in tensors.items() if _module_names(k) != missing},
              tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match="visual.blocks.1.attn.qkv.bias"):
        load_model(files, load_config(files), torch.float32, torch.device("cpu"), max_positions=512)


# The layout of the hub files' config.json (Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct), shrunk:
# text keys at the top level, rope_scaling type 'mrope', in_chans, no hidden_act for Qwen2-VL.
HUB_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=1024,
                tie_word_embeddings=True, image_token_id=IMAGE_TOKEN, vision_start_token_id=VISION_START,
                vision_end_token_id=VISION_END, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})


@pytest.mark.parametrize("kind", KINDS)
def test_hub_config_layout(kind):
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, mlp_ratio=4, num_heads=2, in_chans=3, hidden_size=64, patch_size=14,
                      spatial_merge_size=2, spatial_patch_size=14, temporal_patch_size=2)
        raw = dict(HUB_TEXT, architectures=["Qwen2VLForConditionalGeneration"], model_type="qwen2_vl",
                   vision_config=vision)
    else:
        vision = dict(depth=2, hidden_act="silu", hidden_size=32, intermediate_size=48, num_heads=2, in_chans=3,
                      out_hidden_size=64, patch_size=14, spatial_merge_size=2, spatial_patch_size=14, window_size=112,
                      fullatt_block_indexes=[1], tokens_per_second=2, temporal_patch_size=2)
        raw = dict(HUB_TEXT, architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
                   vision_config=vision)
    config = ModelConfig.from_hf_dict(raw, "config.json")
    assert config.mrope_section == (2, 3, 3) and config.rope_scaling is None and config.rope_theta == 1e6
    assert config.tie_word_embeddings and config.image_token_id == IMAGE_TOKEN
    vc = VisionConfig.from_model_config(config)
    assert (vc.in_channels, vc.patch_size, vc.merge_size, vc.out_dim, vc.embed_dim) == (3, 14, 2, 64, 32)
    if kind == "qwen2_vl":
        assert (vc.mlp_dim, vc.hidden_act, vc.is_windowed) == (128, "quick_gelu", False)
    else:
        assert (vc.mlp_dim, vc.hidden_act, vc.is_windowed, vc.window_size, vc.fullatt_block_indexes) == (
            48, "silu", True, 112, (1,))
    # the hub's preprocessor_config.json names the pixel bounds at the top level
    processor = Qwen2VLImageProcessor({"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                                       "temporal_patch_size": 2, "merge_size": 2}, config)
    assert (processor.min_pixels, processor.max_pixels, processor.image_token_id) == (3136, 12845056, IMAGE_TOKEN)
