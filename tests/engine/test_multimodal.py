"""The image seam without a vision model: placeholder expansion, prefix-cache keys, the encoder cache, the
runner's plan of image pieces and Qwen2-VL-style rotary rows, and the engine's checks."""
import numpy as np
import pytest
import torch

from engine.block_manager import BlockManager
from engine.encoder_cache import EncoderCache
from engine.messages import EngineInfo
from engine.model_runner import _mrope_rows
from engine.multimodal import ImageInput, ProcessedImage, block_image_keys, expand_image_tokens
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.validation import InvalidRequest, check_request

IMG = 9


def processed(seed: int, num_tokens: int) -> ProcessedImage:
    pixels = np.random.default_rng(seed).random((3, 4, 4), dtype=np.float32)
    return ProcessedImage(pixels, None, num_tokens)


def test_each_placeholder_becomes_its_images_tokens():
    a, b = processed(0, 3), processed(1, 5)
    ids, placed = expand_image_tokens([1, IMG, 2, 3, IMG, 4], [a, b], IMG)
    assert ids == [1, IMG, IMG, IMG, 2, 3] + [IMG] * 5 + [4]
    assert [(p.offset, p.num_tokens, p.end) for p in placed] == [(1, 3, 4), (6, 5, 11)]
    assert placed[0].content_hash == a.content_hash != b.content_hash
    with pytest.raises(ValueError, match="1 image placeholder token.* for 2 image"):
        expand_image_tokens([1, IMG, 2], [a, b], IMG)


def test_content_hash_names_the_pixels():
    assert processed(0, 3).content_hash == processed(0, 3).content_hash
    assert processed(0, 3).content_hash != processed(2, 3).content_hash


def _seq(images: list[ProcessedImage], prefix: list[int]) -> Sequence:
    ids, placed = expand_image_tokens(prefix + [IMG] + [5] * 20, images, IMG)
    return Sequence("s", ids, SamplingParams(), images=tuple(placed))


def test_the_same_tokens_with_another_image_hash_differently():
    bm = BlockManager(num_blocks=32, block_size=4, enable_prefix_caching=True)
    first, same, other = _seq([processed(0, 6)], [1, 2]), _seq([processed(0, 6)], [1, 2]), _seq([processed(1, 6)], [1, 2])
    assert first.all_token_ids == other.all_token_ids
    bm.allocate(first, first.num_tokens)
    first.num_computed_tokens = first.num_tokens
    bm.register_computed(first)
    assert bm.match_prefix(same) == 24           # every full block but the one holding the last token
    assert bm.match_prefix(other) == 0           # the first block holds image tokens: another image, no hit
    # blocks before the image keep their plain hash
    assert block_image_keys(first.images, 0, 2) == b""


def test_encoder_cache_encodes_once_in_one_batch_and_evicts_least_recent():
    calls = []

    def encode(images):
        calls.append(len(images))
        return [torch.full((i.num_tokens, 2), float(i.num_tokens)) for i in images]

    cache = EncoderCache(encode, capacity_tokens=10)
    a, b, c = (ImageInput(bytes([k]), np.zeros(1), None, 0, n) for k, n in ((1, 4), (2, 4), (3, 4)))
    got = cache.embeddings([a, b, a])
    assert calls == [2] and set(got) == {a.content_hash, b.content_hash}
    cache.embeddings([a])
    assert calls == [2] and cache.num_hits == 1 and cache.num_encoded == 2
    cache.embeddings([c])                        # 12 rows > 10: b, the least recent, goes
    cache.embeddings([a, b])
    assert calls == [2, 1, 1] and cache.num_encoded == 4


def test_mrope_rows_follow_the_prompt_then_the_delta():
    seq = Sequence("s", [1, 2, 3, 4], SamplingParams())
    seq.mrope_positions = np.array([[0, 1, 1, 3], [0, 1, 2, 3], [0, 2, 1, 3]])
    seq.mrope_delta = -1
    seq.append_token(7)
    seq.append_token(8)
    rows = _mrope_rows(seq, 2, 6)
    assert rows.tolist() == [[1, 3, 3, 4], [2, 3, 3, 4], [1, 3, 3, 4]]
    assert _mrope_rows(seq, 5, 6).tolist() == [[4], [4], [4]]


def _info(vision: bool, limit: int = 2) -> EngineInfo:
    return EngineInfo("m", 64, 8, 16, 128, "cpu", "float32", (2,), 32, False, 0.0, is_vision_model=vision,
                      limit_images_per_prompt=limit)


def test_the_engine_checks_images():
    ids, placed = expand_image_tokens([1, IMG, 2, IMG], [processed(0, 3), processed(1, 3)], IMG)
    check_request(ids, 4, _info(True), images=placed)
    with pytest.raises(InvalidRequest, match="does not take images"):
        check_request(ids, 4, _info(False), images=placed)
    with pytest.raises(InvalidRequest, match="at most 1"):
        check_request(ids, 4, _info(True, limit=1), images=placed)
    with pytest.raises(InvalidRequest, match="disjoint spans"):
        check_request(ids[:5], 4, _info(True), images=placed)
