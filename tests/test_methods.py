"""Sparsifier and quantizer objects, SparseLinear and the one model tree (issue 12)."""

import subprocess
import sys

import numpy as np
import pytest
from gradcheck import gradcheck

from minisparse.linear import SparseLinear, sparse_linear
from minisparse.model import GPT, GPTConfig, count_params, param_shapes
from minisparse.nn import Module, Parameter
from minisparse.quant import Int8Absmax, NoQuant, TernaryAbsmean, quantizers
from minisparse.sparsity import (
    BlockTopK,
    Dense,
    Threshold,
    TopK,
    block_topk_mask,
    k_for,
    make_sparsifier,
    topk_forward,
)
from minisparse.tensor import Tensor

X = np.random.default_rng(0).standard_normal((3, 8))


def test_sparsifiers_compute_the_reference():
    np.testing.assert_array_equal(TopK(k=3).forward(X)[0], topk_forward(X, k=3)[0])
    y, _, r = TopK(sparsity=0.5, rescale="l2").forward(X)
    want = topk_forward(X, sparsity=0.5, rescale="l2")
    np.testing.assert_array_equal(y, want[0])
    np.testing.assert_array_equal(r, want[2])
    np.testing.assert_array_equal(BlockTopK((2, 4)).mask(X), block_topk_mask(X, 2, 4))
    tau = Tensor(np.float64(0.5))
    np.testing.assert_array_equal(Threshold(tau).mask(X), np.abs(X) > 0.5)
    assert Dense()(Tensor(X)).data is X


@pytest.mark.parametrize("sparsifier, kept", [
    (Dense(), 8), (TopK(sparsity=0.7), k_for(8, sparsity=0.7)), (TopK(k=5), 5),
    (BlockTopK((1, 4)), 2), (Threshold(Tensor(np.float64(0)), target=0.5), 4)])
def test_kept_inputs(sparsifier, kept):
    assert sparsifier.kept_inputs(8) == kept


@pytest.mark.parametrize("ste", [True, False])
def test_threshold_backward_is_spec_1_with_r_1(ste):
    x = Tensor(X.copy(), requires_grad=True)
    g = np.random.default_rng(1).standard_normal(X.shape)
    Threshold(Tensor(np.float64(0.5)), ste=ste)(x).backward(g)
    np.testing.assert_array_equal(x.grad, g if ste else np.where(np.abs(X) > 0.5, g, 0))


@pytest.mark.parametrize("make, words", [
    (lambda: TopK(), ["TopK", "exactly one of k or sparsity"]),
    (lambda: TopK(sparsity=1.0), ["TopK", "sparsity", "[0, 1)"]),
    (lambda: TopK(k=0), ["TopK", "k"]),
    (lambda: TopK(k=2, rescale="L2"), ["rescale", "L2"]),
    (lambda: BlockTopK((3, 2)), ["BlockTopK", "block N", "3"]),
    (lambda: BlockTopK(4), ["BlockTopK", "pair (N, M)"]),
    (lambda: Threshold(0.5), ["Threshold", "0-d Tensor"]),
    (lambda: quantizers(4), ["bits", "1.58", "4"]),
    (lambda: make_sparsifier(k=2, block=(2, 4)), ["k or block"]),
])
def test_each_option_is_checked_by_its_constructor(make, words):
    with pytest.raises((TypeError, ValueError)) as e:
        make()
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bits_158_is_int8_activations_and_ternary_weights():
    assert [type(q) for q in quantizers(1.58)] == [Int8Absmax, TernaryAbsmean]
    assert [type(q) for q in quantizers(None)] == [NoQuant, NoQuant]


def test_sparse_linear_module_equals_the_functional_form_and_gradchecks():
    rng = np.random.default_rng(2)
    x, w = Tensor(rng.standard_normal((2, 3, 8))), Parameter(rng.standard_normal((5, 8)))
    layer = SparseLinear(w, TopK(k=4, rescale="l2"), *quantizers(1.58), backend="numpy")
    np.testing.assert_array_equal(layer(x).data, sparse_linear(
        x, w, k=4, rescale="l2", bits=1.58, backend="numpy").data)
    gradcheck(lambda x, w: SparseLinear(w, TopK(k=4, ste=False), backend="numpy")(x), x.data,
              w.data)


def test_a_module_weight_is_named_by_the_module():
    class Net(Module):
        def __init__(self):
            self.proj = SparseLinear(Parameter(np.zeros((2, 2))))
            self.layers = [SparseLinear(Parameter(np.zeros((2, 2))))]
            self.norm = Parameter(np.ones(2))

    assert [n for n, _ in Net().named_parameters()] == ["proj", "layers.0", "norm"]
    assert [n for n, _ in Net().named_modules()] == ["", "proj", "layers.0"]


def test_param_shapes_and_counts_come_from_the_tree_without_allocating():
    config = GPTConfig(vocab_size=50_000, d_model=1024, n_layers=2, n_heads=8, sparsity=0.5)
    shapes = param_shapes(config)  # would be 100M floats if allocated
    assert shapes["blocks.1.ffn.down"] == (1024, config.ffn_hidden)
    counts = count_params(config)
    assert counts["N"] == sum(int(np.prod(s)) for s in shapes.values())
    small = GPTConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, sparsity=0.5)
    model = GPT(small, np.random.default_rng(0))
    assert param_shapes(small) == {n: p.shape for n, p in model.named_parameters()}


def test_reference_modules_import_no_kernels():
    code = ("import sys, numpy as np\n"
            "from minisparse.model import GPT, GPTConfig\n"
            "c = GPTConfig(vocab_size=5, d_model=16, n_heads=2, n_layers=1, sparsity=0.5)\n"
            "GPT(c, np.random.default_rng(0), backend='numpy')(np.zeros((1, 3), int))\n"
            "print(sorted(m for m in sys.modules if 'kernels' in m or m.startswith('numba')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pack_model_fails_loudly_on_an_unknown_method():
    from minisparse.kernels import pack_model

    class Halve(Dense):
        pass

    model = GPT(GPTConfig(vocab_size=5, d_model=16, n_heads=2, n_layers=1),
                np.random.default_rng(0), backend="numba")
    model.blocks[0].ffn.up.sparsifier = Halve()
    with pytest.raises(TypeError, match="no fast kernel for the sparsifier Halve"):
        pack_model(model)
    with pytest.raises(TypeError, match="no fast kernel for the sparsifier Halve"):
        model(np.zeros((1, 2), int))


def test_sparsifiers_name_their_oracle_op():
    from minisparse.oracle.harness import OPS

    assert TopK(k=1).oracle_op in OPS and BlockTopK((1, 2)).oracle_op in OPS
    assert Threshold(Tensor(np.float64(0))).oracle_op == "threshold"  # SPEC 11; not in OPS yet
    assert Dense().oracle_op is None
