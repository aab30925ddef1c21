"""engine.gguf against Hugging Face transformers' GGUF loading and gguf-py's reader."""
import itertools
import time
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import pytest
import torch
from gguf import quants
from gguf.constants import GGMLQuantizationType as QT

from engine.gguf import GGUFError, GGUFFile, read_gguf

transformers = pytest.importorskip("transformers")

# Weight types cycled through the synthetic files' matrices (norms and biases stay F32).
MATRIX_QTYPES = [QT.Q8_0, QT.F16, QT.Q4_1, QT.BF16, QT.Q5_0, QT.F32, QT.Q4_0, QT.Q5_1]


def write_tiny(path: Path, arch: str, *, bias: bool = False, qk_norm: bool = False, tied: bool = True,
               layers: int = 2, hidden: int = 256, heads: int = 2, kv_heads: int = 1, head_dim: int = 128,
               ffn: int = 320, vocab: int = 96, extra_kv=None, extra_tensors=(),
               matrix_qtypes: list[QT] = MATRIX_QTYPES) -> Path:
    """A small random model written by gguf-py's GGUFWriter, laid out as llama.cpp lays out `arch`."""
    rng = np.random.default_rng(len(arch) + 10 * bias + 100 * qk_norm)
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_vocab_size(vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key_writer in extra_kv or ():
        key_writer(writer)
    counter = iter(range(10_000))

    def add(name: str, shape: tuple[int, ...], qtype: QT | None = None) -> None:
        qtype = qtype or matrix_qtypes[next(counter) % len(matrix_qtypes)]
        data = quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=None if qtype in (QT.F32, QT.F16) else qtype)

    add("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,), QT.F32)
        add(f"blk.{i}.ffn_norm.weight", (hidden,), QT.F32)
        for proj, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            add(f"blk.{i}.attn_{proj}.weight", (rows, hidden))
            if bias:
                add(f"blk.{i}.attn_{proj}.bias", (rows,), QT.F32)
        add(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        if qk_norm:
            add(f"blk.{i}.attn_q_norm.weight", (head_dim,), QT.F32)
            add(f"blk.{i}.attn_k_norm.weight", (head_dim,), QT.F32)
        add(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        add(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    add("output_norm.weight", (hidden,), QT.F32)
    if not tied:
        add("output.weight", (vocab, hidden))
    for name, array, qtype in extra_tensors:
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_model(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32)


def assert_matches_state_dict(ours: GGUFFile, state_dict: dict[str, torch.Tensor]) -> None:
    tensors = dict(ours.iter_tensors(torch.float32))
    expected_names = set(state_dict) - ({"lm_head.weight"} if ours.hf_config()["tie_word_embeddings"] else set())
    assert set(tensors) == expected_names
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.float32 and tensor.shape == state_dict[name].shape, name
        if not torch.equal(tensor, state_dict[name]):  # exact is expected; the tolerance is the brief's bound
            torch.testing.assert_close(tensor, state_dict[name], rtol=1e-6, atol=0, msg=name)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # On a shared 2-core box, OpenMP workers spinning against other processes make two-thread runs
    # of these many ~1M-element ops 10x slower (measured: 12 s vs 1 s for the whole SmolLM2 load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smol(default_gguf_path: str) -> GGUFFile:
    return read_gguf(default_gguf_path)


@pytest.fixture(scope="module")
def smol_hf(default_gguf_path: str) -> torch.nn.Module:
    return hf_model(Path(default_gguf_path))


def test_smollm2_tensors_equal_transformers(smol: GGUFFile, smol_hf: torch.nn.Module) -> None:
    assert smol.architecture == "llama"
    assert_matches_state_dict(smol, smol_hf.state_dict())


def test_smollm2_hf_config_matches_transformers(smol: GGUFFile, smol_hf: torch.nn.Module) -> None:
    ours, theirs = smol.hf_config(), smol_hf.config
    same = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
            "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act"]
    assert {k: ours[k] for k in same} == {k: getattr(theirs, k) for k in same}
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"]
    assert ours["rope_scaling"] is None and theirs.rope_parameters["rope_type"] == "default"
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["torch_dtype"] == "float32"
    # Our dict is a config transformers itself accepts, and it builds the same model config.
    rebuilt = transformers.AutoConfig.for_model(**ours)
    assert {k: getattr(rebuilt, k) for k in same} == {k: getattr(theirs, k) for k in same}
    assert rebuilt.rope_parameters == theirs.rope_parameters


def test_smollm2_metadata_and_tensor_infos_match_gguf_reader(smol: GGUFFile, default_gguf_path: str) -> None:
    reader = gguf.GGUFReader(default_gguf_path)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert smol.metadata == expected
    assert [(t.name, t.shape, t.qtype, t.offset, t.num_bytes) for t in smol.tensor_infos] == [
        (t.name, tuple(reversed(t.shape.tolist())), t.tensor_type, t.data_offset, t.n_bytes) for t in reader.tensors]


def test_smollm2_loads_fast(default_gguf_path: str) -> None:
    start = time.perf_counter()
    num_params = sum(t.numel() for _, t in read_gguf(default_gguf_path).iter_tensors(torch.float32))
    elapsed = time.perf_counter() - start
    assert num_params > 130_000_000
    # ~0.7 s on the dev machine; the bound holds on a machine 5x slower (or that busy) and still catches a
    # dequantizer gone per-element (minutes)
    assert elapsed < 15.0, f"loading took {elapsed:.2f}s"


def test_smollm2_bf16(smol: GGUFFile, smol_hf: torch.nn.Module) -> None:
    state_dict = smol_hf.state_dict()
    for name, tensor in itertools.islice(smol.iter_tensors(torch.bfloat16), 12):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, state_dict[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("arch,bias,qk_norm,tied", [("qwen2", True, False, False), ("qwen3", False, True, True),
                                                    ("llama", False, False, False)])
def test_synthetic_matches_transformers(tmp_path: Path, arch: str, bias: bool, qk_norm: bool, tied: bool) -> None:
    path = write_tiny(tmp_path / f"{arch}.gguf", arch, bias=bias, qk_norm=qk_norm, tied=tied)
    ours, model = read_gguf(path), hf_model(path)
    assert_matches_state_dict(ours, model.state_dict())
    config = ours.hf_config()
    assert config["model_type"] == arch and config["tie_word_embeddings"] == tied
    assert config["attention_bias"] == (arch == "qwen2")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings"):
        assert config[key] == getattr(model.config, key), key
    # Qwen2Config has no head_dim (it is always hidden/heads); the others carry it.
    assert config["head_dim"] == getattr(model.config, "head_dim", 128) == 128
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"] == 1e6


def test_synthetic_names_and_shapes(tmp_path: Path) -> None:
    qwen2 = dict(read_gguf(write_tiny(tmp_path / "q2.gguf", "qwen2", bias=True, tied=False)).iter_tensors())
    assert qwen2["model.layers.1.self_attn.q_proj.bias"].shape == (256,)
    assert qwen2["model.layers.1.self_attn.k_proj.bias"].shape == (128,)
    assert qwen2["model.layers.0.self_attn.o_proj.weight"].shape == (256, 256)
    assert qwen2["model.layers.0.mlp.down_proj.weight"].shape == (256, 320)
    assert qwen2["model.layers.0.mlp.gate_proj.weight"].shape == (320, 256)
    assert qwen2["lm_head.weight"].shape == (96, 256)
    qwen3 = dict(read_gguf(write_tiny(tmp_path / "q3.gguf", "qwen3", qk_norm=True)).iter_tensors())
    assert qwen3["model.layers.1.self_attn.q_norm.weight"].shape == (128,)
    assert qwen3["model.layers.1.self_attn.k_norm.weight"].shape == (128,)
    assert "lm_head.weight" not in qwen3 and not any(k.endswith(".bias") for k in qwen3)


def test_vocab_size_from_token_list(tmp_path: Path) -> None:
    path = tmp_path / "tokens.gguf"
    write_tiny(path, "qwen3", vocab=96, extra_kv=[lambda w: w.add_token_list([f"t{i}" for i in range(96)])])
    config = read_gguf(path).hf_config()
    # Drop the vocab_size key: the token list must stand in for it.
    data = path.read_bytes()
    assert config["vocab_size"] == 96 and b"qwen3.vocab_size" in data
    stripped = tmp_path / "stripped.gguf"
    stripped.write_bytes(data.replace(b"qwen3.vocab_size", b"qwen3.vocab_sizX"))
    assert read_gguf(stripped).hf_config()["vocab_size"] == 96


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_rope_scaling(tmp_path: Path, kind: str) -> None:
    def keys(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(128)
        if kind == "yarn":
            w.add_rope_scaling_yarn_beta_fast(32.0)
            w.add_rope_scaling_yarn_beta_slow(1.0)
    config = read_gguf(write_tiny(tmp_path / "r.gguf", "llama", extra_kv=[keys])).hf_config()
    assert config["rope_scaling"]["rope_type"] == kind and config["rope_scaling"]["factor"] == 4.0
    # transformers validates rope parameters when it builds the config from our dict.
    params = transformers.AutoConfig.for_model(**config).rope_parameters
    assert params["rope_type"] == kind and params["factor"] == 4.0
    assert params["original_max_position_embeddings"] == 128
    if kind == "yarn":
        assert (params["beta_fast"], params["beta_slow"]) == (32.0, 1.0)


def test_mistral_is_llama_by_name(tmp_path: Path) -> None:
    # transformers switches to Mistral only for general.name == "mistral"; we match any "Mistral ..." name.
    path = write_tiny(tmp_path / "m.gguf", "llama", tied=False, extra_kv=[lambda w: w.add_name("mistral")])
    config = read_gguf(path).hf_config()
    assert (config["model_type"], config["architectures"]) == ("mistral", ["MistralForCausalLM"])
    assert config["sliding_window"] is None
    assert transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name).model_type == "mistral"
    # transformers cannot load Mistral GGUF weights with this gguf-py; the same tensors written as plain
    # llama (same seed) can be, and ours must still undo llama.cpp's q/k row permutation.
    llama_path = write_tiny(tmp_path / "l.gguf", "llama", tied=False)
    assert_matches_state_dict(read_gguf(path), hf_model(llama_path).state_dict())


def test_missing_config_key(tmp_path: Path) -> None:
    path = write_tiny(tmp_path / "k.gguf", "qwen3")
    path.write_bytes(path.read_bytes().replace(b"qwen3.block_count", b"qwen3.block_counX"))
    with pytest.raises(GGUFError) as info:
        read_gguf(path).hf_config()
    assert str(path) in str(info.value) and "qwen3.block_count" in str(info.value)


def assert_one_line_error(path: Path | str, *needles: str) -> None:
    with pytest.raises(GGUFError) as info:
        read_gguf(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message


def test_not_a_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_text("definitely not a model\n" * 10)
    assert_one_line_error(tmp_path / "x.gguf", "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert_one_line_error(tmp_path / "empty.gguf", "cannot map")
    assert_one_line_error(tmp_path / "missing.gguf", "cannot map")


def test_truncated_file(tmp_path: Path, default_gguf_path: str) -> None:
    with open(default_gguf_path, "rb") as f:
        head = f.read(8 << 20)
    for size in (20, 1000, 100_000, len(head)):  # in the counts, the metadata, the tokens, the tensor data
        (tmp_path / "t.gguf").write_bytes(head[:size])
        assert_one_line_error(tmp_path / "t.gguf", "truncated")


def test_bad_version(tmp_path: Path) -> None:
    data = bytearray(write_tiny(tmp_path / "v.gguf", "qwen3").read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    (tmp_path / "v.gguf").write_bytes(bytes(data))
    assert_one_line_error(tmp_path / "v.gguf", "version 7")


def test_unknown_architecture(tmp_path: Path) -> None:
    assert_one_line_error(write_tiny(tmp_path / "a.gguf", "gemma2"), "unknown architecture", "gemma2")


def test_unsupported_quantization(tmp_path: Path) -> None:
    blocks = np.zeros((4, 18 * 8), dtype=np.uint8)   # IQ4_NL: 32 values in 18 bytes
    path = write_tiny(tmp_path / "q.gguf", "qwen3", extra_tensors=[("blk.0.attn_q_norm.weight", blocks, QT.IQ4_NL)])
    assert_one_line_error(path, "blk.0.attn_q_norm.weight", "IQ4_NL")


def test_unexpected_tensor(tmp_path: Path) -> None:
    extra = [("blk.0.ffn_gate_exps.weight", np.zeros((4, 32), dtype=np.float32), None)]
    assert_one_line_error(write_tiny(tmp_path / "e.gguf", "qwen2", extra_tensors=extra), "blk.0.ffn_gate_exps")


def test_our_type_table_is_the_gguf_packages() -> None:
    """engine/gguf_types.py writes the GGML type ids and block sizes out (importing gguf costs ~130 ms a start):
    every id and size must be the package's."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from engine.gguf_types import QT as OURS, QUANT_SIZES, type_name
    for member in OURS:
        assert GGMLQuantizationType[member.name] == member, member
    for qtype, sizes in QUANT_SIZES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType(qtype)] == sizes, qtype
    assert type_name(12) == "Q4_K (12)" and type_name(999) == "unknown type 999"


def test_reading_a_gguf_header_imports_no_gguf_package(tmp_path) -> None:
    import subprocess
    import sys
    path = write_tiny(tmp_path / "m.gguf", "llama")
    code = (f"import sys; from engine.gguf import read_gguf; read_gguf({str(path)!r}).hf_config(); "
            "assert not any(m == 'gguf' or m.startswith('gguf.') for m in sys.modules), 'gguf imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_tokenizer_load_leaves_the_cached_header_undecoded(default_gguf_path: str) -> None:
    """The server keeps the parsed header cached (config, tokenizer, weights all read it); after the tokenizer
    is built, its ~100k strings are not held twice: the header's arrays are back to file offsets, and decode
    to the same strings when asked again."""
    from engine.gguf import LazyStrings
    from engine.model_files import ModelFiles, gguf_file, load_tokenizer
    files = ModelFiles.at(default_gguf_path)
    tokenizer = load_tokenizer(files)
    header = gguf_file(files)   # the cached one the tokenizer was built from
    arrays = [v for v in header.metadata.values() if isinstance(v, LazyStrings)]
    assert len(arrays) >= 2 and all(a._items is None for a in arrays)   # vocabulary and merges
    tokens = header.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == tokenizer.vocab_size and tokens == gguf.GGUFReader(default_gguf_path).fields[
        "tokenizer.ggml.tokens"].contents()
