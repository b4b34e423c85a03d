"""Write a minisparse model as a GGUF file (llama.cpp's format), with the ``gguf`` package.

The file describes a llama-architecture model of the same shape: tied embedding (no
``output.weight``: llama.cpp then reads ``token_embd``), RMSNorm gains, the seven projections.
Ternary projections (bits 1.58) whose rows hold a multiple of 256 weights are stored as TQ2_0
(2-bit codes, one fp16 scale per 256 weights: Qw(W) = t / s_w exactly, with 1 / s_w rounded to
fp16); other projections as F16 (ternary values t / s_w in fp16) or F32 (float models).

What llama.cpp then runs differs from minisparse in ways that do not change the cost of a
decode step, which is what the file is for (``minisparse bench --llama-bench``): its llama
graph uses SiLU (a relu2 model's GLU is written as is), no top-K sparsity, and RoPE on
adjacent pairs (minisparse rotates halves; the q and k rows are not permuted here).
"""

from __future__ import annotations

import numpy as np

from .model import GPTConfig
from .quant import absmean_ternarize

TQ2_ROW = 256  # TQ2_0 blocks hold 256 weights of one row
_NAMES = {"attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_output",
          "ffn.up": "ffn_up", "ffn.gate": "ffn_gate", "ffn.down": "ffn_down"}


def rope_pairs(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q or k weight [d, d_in] reordered from SPEC 6's half-split RoPE (feature i
    pairs with i + d_head/2) to GGML's adjacent pairs (2i with 2i + 1), per head: the
    permutation llama.cpp's own converter applies to LLaMA checkpoints. Scores q·k are
    unchanged, since q and k are permuted alike."""
    d_head = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d_head // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(params: dict, config: GPTConfig, vocab: list, path) -> None:
    """Write ``params`` (SPEC names, float32/64) of a GLU model with ``config`` and a
    character vocabulary (``vocab[i]`` the text of token i) to the GGUF file ``path``."""
    import gguf

    if isinstance(config, dict):
        config = GPTConfig.from_dict(config)
    if len(vocab) != config.vocab_size:
        raise ValueError(f"write_gguf: vocab has {len(vocab)} tokens, the config needs "
                         f"{config.vocab_size}")
    if config.ffn != "glu" or config.ffn_act != "silu" or config.sparsify != "topk":
        raise ValueError("write_gguf: llama.cpp's llama architecture runs a GLU feed-forward "
                         "with SiLU and no thresholds; got ffn="
                         f"{config.ffn!r}, ffn_act={config.ffn_act!r}, "
                         f"sparsify={config.sparsify!r}")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(config.context)
    w.add_embedding_length(config.d_model)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_hidden)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_heads)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_rope_freq_base(config.rope_base)
    w.add_rope_dimension_count(config.d_model // config.n_heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if config.bits else gguf.LlamaFileType.ALL_F32)
    # a character vocabulary as a SentencePiece-style ("llama") one: one piece per token, no
    # merges (a "gpt2" vocabulary must carry a merge list, and llama.cpp refuses an empty one)
    w.add_tokenizer_model("llama")
    w.add_token_list([str(t) for t in vocab])
    w.add_token_scores([0.0] * len(vocab))
    w.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)

    def f32(name, a):
        w.add_tensor(name, np.ascontiguousarray(a, np.float32))

    f32("token_embd.weight", params["tok_emb"])
    f32("output_norm.weight", params["norm"])
    for i in range(config.n_layers):
        f32(f"blk.{i}.attn_norm.weight", params[f"blocks.{i}.attn_norm"])
        f32(f"blk.{i}.ffn_norm.weight", params[f"blocks.{i}.ffn_norm"])
        for ours, theirs in _NAMES.items():
            name, a = f"blk.{i}.{theirs}.weight", params[f"blocks.{i}.{ours}"]
            if ours in ("attn.q", "attn.k"):
                a = rope_pairs(a, config.n_heads)
            if not config.bits:
                f32(name, a)
                continue
            t, s = absmean_ternarize(a)  # SPEC 4: Qw(W) = t / s
            qw = (t / s).astype(np.float32)
            if a.shape[1] % TQ2_ROW == 0:
                kind = gguf.GGMLQuantizationType.TQ2_0
                w.add_tensor(name, gguf.quants.quantize(qw, kind), raw_dtype=kind)
            else:
                w.add_tensor(name, qw.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
