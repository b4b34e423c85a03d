"""write_gguf against the gguf package's own reader and dequantizer: shapes, metadata, and
the ternary codes exactly (TQ2_0 and F16), float weights bit for bit."""

import numpy as np
import pytest

from minisparse.model import GPT, GPTConfig
from minisparse.quant import absmean_ternarize

gguf = pytest.importorskip("gguf", reason="the optional gguf package is not installed")

from minisparse.gguf import rope_pairs, write_gguf  # noqa: E402


def _read(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}
    types = {t.name: t.tensor_type for t in reader.tensors}
    return reader, tensors, types


@pytest.mark.parametrize("bits", [1.58, None])
def test_gguf_round_trip(tmp_path, bits):
    config = GPTConfig(vocab_size=11, d_model=256, n_layers=2, n_heads=4, ffn_hidden=96,
                       bits=bits, context=16, ffn_act="silu")
    params = GPT(config, np.random.default_rng(0)).params_dict()
    vocab = [chr(ord("a") + i) for i in range(11)]
    path = tmp_path / "model.gguf"
    write_gguf(params, config, vocab, path)
    reader, tensors, types = _read(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["llama.feed_forward_length"].contents() == 96
    np.testing.assert_array_equal(tensors["token_embd.weight"], params["tok_emb"])
    assert "output.weight" not in tensors  # tied head
    for i in range(2):
        for ours, theirs in (("attn.q", "attn_q"), ("ffn.up", "ffn_up"), ("ffn.down", "ffn_down")):
            w = params[f"blocks.{i}.{ours}"]
            if ours == "attn.q":  # GGML's RoPE pairs adjacent features: rows reordered per head
                w = rope_pairs(w, config.n_heads)
            got = tensors[f"blk.{i}.{theirs}.weight"]
            assert got.shape == w.shape
            if bits is None:
                np.testing.assert_array_equal(got, w)
                continue
            t, s = absmean_ternarize(w)
            scale = np.float32(np.float16(1 / s))  # one fp16 scale (TQ2_0 block or F16 values)
            np.testing.assert_array_equal(np.sign(got), t)  # the codes, exactly
            np.testing.assert_allclose(got, t * scale, rtol=1e-6)
            kind = gguf.GGMLQuantizationType.TQ2_0 if w.shape[1] % 256 == 0 \
                else gguf.GGMLQuantizationType.F16
            assert types[f"blk.{i}.{theirs}.weight"] == kind


def test_gguf_rejects_a_vocab_of_the_wrong_size(tmp_path):
    config = GPTConfig(vocab_size=5, d_model=8, n_layers=1, n_heads=2)
    params = GPT(config, np.random.default_rng(0)).params_dict()
    with pytest.raises(ValueError, match="vocab has 3 tokens"):
        write_gguf(params, config, ["a", "b", "c"], tmp_path / "x.gguf")


def test_rope_pairs_turn_half_split_rope_into_adjacent_pairs():
    # SPEC 6 rotates feature j with j + d_head/2; GGML rotates 2j with 2j + 1. After the
    # permutation, row 2j of each head is the old row j and row 2j + 1 the old row j + d_head/2.
    n_heads, d_head = 2, 6
    w = np.arange(n_heads * d_head, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    got = rope_pairs(w, n_heads)[:, 0]
    np.testing.assert_array_equal(got, [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11])


@pytest.mark.parametrize("field", [{"ffn_act": "relu2"}, {"sparsify": "threshold"},
                                   {"ffn": "moe", "n_experts": 2, "top_experts": 1}])
def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path, field):
    config = GPTConfig(vocab_size=5, d_model=8, n_layers=1, n_heads=2,
                       **{"ffn_act": "silu", **field})
    params = GPT(config, np.random.default_rng(0)).params_dict()
    with pytest.raises(ValueError, match="llama architecture"):
        write_gguf(params, config, list("abcde"), tmp_path / "x.gguf")
