"""minisparse.torch's ops and QSparseLinear against the oracle: the conformance harness in
float32 and float64 (forward, tie rule, half steps, STE gradients), plus what the harness does
not cover (threshold sparsity, MoE, the drop-in module, bad arguments)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (the torch extra)")

from minisparse.oracle import (  # noqa: E402
    absmax_quantize,
    absmean_ternarize,
    assert_conforms,
    compare,
    dequantize,
    ffn_backward,
    ffn_forward,
    sparse_linear_forward,
    topk_forward,
)
from minisparse.torch import GLU, MoE, QSparseLinear, qsparse_linear, threshold  # noqa: E402
from minisparse.torch import functions as F  # noqa: E402

CASES = 60  # hypothesis cases per op (each is cheap); derandomized under CI


def numpy_io(device):
    """Wrap a torch function for the harness: NumPy in (on ``device``), NumPy out; with
    ``grads``, the last array is grad_y: backpropagate it, return the inputs' gradients too."""

    def wrap(fn, grads=False):
        def wrapped(*arrays, **params):
            arrays, grad_y = (arrays[:-1], arrays[-1]) if grads else (arrays, None)
            inputs = [torch.from_numpy(a).to(device).requires_grad_(grads) for a in arrays]
            out = fn(*inputs, **params)
            if grad_y is None:
                return tuple(o.detach().cpu().numpy() for o in out) if isinstance(out, tuple) \
                    else out.detach().cpu().numpy()
            out.backward(torch.from_numpy(grad_y).to(device))
            return (out.detach().cpu().numpy(), *(t.grad.cpu().numpy() for t in inputs))

        return wrapped

    return wrap


def test_ops_conform_to_the_reference(torch_device):
    wrap = numpy_io(torch_device)
    ops = {
        "topk": wrap(lambda x, k: F.topk(x, k)),
        "block_topk": wrap(lambda x, n, m: F.topk(x, block=(n, m))),
        "sparsify": wrap(lambda x, k, rescale, ste: F.topk(x, k, rescale=rescale, ste=ste),
                         grads=True),
        "absmax": wrap(F.absmax_quantize),
        "absmean": wrap(F.absmean_ternarize),
        "sparse_linear": wrap(lambda x, w, **p: qsparse_linear(x, w, **p), grads=True),
    }
    if not _reference_l2_is_underflow_safe():
        del ops["sparsify"]  # covered by test_l2_rescale_neither_overflows_nor_underflows
    for op, fn in ops.items():
        assert_conforms(op, fn, max_examples=CASES)


def _reference_l2_is_underflow_safe():
    """SPEC 1 asks for norms without underflow; the NumPy reference before the oracle work of
    issue 13 squares first, so a float32 row of 5e-31 gets r = 0 instead of 1 there."""
    return topk_forward(np.array([[-5e-31]], np.float32), k=1, rescale="l2")[2].item() == 1


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e-30), (torch.float32, 1e25),
                                          (torch.float64, 1e-200), (torch.float64, 1e200)])
def test_l2_rescale_neither_overflows_nor_underflows(dtype, scale):
    """SPEC 1: r = ||x|| / max(||x ⊙ M||, 1e-12) is the mathematical value for any finite row,
    here checked against the same rows at scale 1 (r is scale-free while ||x ⊙ M|| > 1e-12)."""
    x = torch.tensor([[3.0, -4.0, 1.0, 2.0, -2.0, 0.5]], dtype=torch.float64)
    exact = F.l2_rescale(x, F.topk_mask(x, 2))
    y = (x * scale).to(dtype)
    r = F.l2_rescale(y, F.topk_mask(y, 2))
    assert torch.isfinite(r).all()
    if scale > 1:
        np.testing.assert_allclose(r.double().numpy(), exact.numpy(), rtol=1e-6)
    else:  # ||x ⊙ M|| < 1e-12: the floor applies, r = ||x|| / 1e-12
        norm = scale * float(np.sqrt(34.25))  # ||x|| = sqrt(9 + 16 + 1 + 4 + 4 + 0.25)
        np.testing.assert_allclose(r.double().numpy(), [[norm / 1e-12]], rtol=1e-6)


def test_qsparse_linear_module_conforms(torch_device):
    """The module itself through the harness: its weight is the parameter the gradient hits."""

    def module(x, w, grad_y, **options):
        w = torch.from_numpy(w)
        layer = QSparseLinear(w.shape[1], w.shape[0], dtype=w.dtype, device=torch_device,
                              **options)
        with torch.no_grad():
            layer.weight.copy_(w)
        x = torch.from_numpy(x).to(torch_device).requires_grad_()
        y = layer(x)
        y.backward(torch.from_numpy(grad_y).to(torch_device))
        return tuple(t.detach().cpu().numpy() for t in (y, x.grad, layer.weight.grad))

    assert_conforms("sparse_linear", module, max_examples=CASES)


@pytest.mark.parametrize("d", [1, 2, 7, 32])
def test_topk_mask_is_the_stable_sort_order_on_tied_rows(torch_device, d):
    """Rows of few distinct magnitudes (many ties, ±0), every k: the mask equals the first k
    of np.argsort(-|x|, kind="stable")."""
    from minisparse.oracle import topk_mask as reference

    x = np.random.default_rng(d).integers(-2, 3, (50, d)).astype(np.float32)
    x = np.where((x == 0) & (np.arange(d) % 2 == 1), np.float32(-0.0), x)  # ±0 tie too
    for k in range(1, d + 1):
        got = F.topk_mask(torch.from_numpy(x).to(torch_device), k).cpu().numpy()
        np.testing.assert_array_equal(got, reference(x, k), err_msg=f"k={k}")


def test_torch_topk_would_fail_the_tie_rule():
    """Guards the stable sort: a top-K by torch.topk breaks SPEC 1's ties somewhere."""
    from minisparse.oracle import check

    def naive(x, k):
        t = torch.from_numpy(x)
        idx = torch.topk(t.abs(), k, dim=-1).indices
        return (t * torch.zeros_like(t, dtype=torch.bool).scatter(-1, idx, True)).numpy()

    assert not check("topk", naive, max_examples=200).passed


@pytest.mark.parametrize("name, quantize, reference",
                         [("FakeQuant int8", F.absmax_quantize, absmax_quantize),
                          ("WeightQuant", F.absmean_ternarize, absmean_ternarize)])
def test_fake_quant_is_the_reference_dequantized_and_straight_through(torch_device, name,
                                                                      quantize, reference):
    """Q(x) = dequantize(quantize(x)) of the NumPy reference, bit for bit; backward g (STE).
    ``WeightQuant.apply(w)`` (lesson 7 imports it) is ``FakeQuant.apply(w, absmean_ternarize)``."""
    x = np.random.default_rng(7).normal(0, 0.02, (6, 40)).astype(np.float32)
    t = torch.from_numpy(x).to(torch_device).requires_grad_()
    y = F.WeightQuant.apply(t) if name == "WeightQuant" else F.FakeQuant.apply(t, quantize)
    np.testing.assert_array_equal(y.detach().cpu().numpy(), dequantize(*reference(x)))
    g = torch.from_numpy(np.random.default_rng(8).normal(size=x.shape).astype(np.float32))
    y.backward(g.to(torch_device))
    np.testing.assert_array_equal(t.grad.cpu().numpy(), g.numpy())


def test_threshold_is_strict_and_straight_through(torch_device):
    x = torch.tensor([[0.5, -0.5, 0.7, -0.2, 0.0]], dtype=torch.float64, device=torch_device,
                     requires_grad=True)
    tau = torch.tensor(0.5, dtype=torch.float64, device=torch_device)
    y = threshold(x, tau)
    assert y.tolist() == [[0.0, 0.0, 0.7, 0.0, 0.0]]  # |x| = tau is dropped (strict)
    y.backward(torch.ones_like(y))
    assert x.grad.tolist() == [[1.0] * 5]  # STE, r = 1
    x.grad = None
    threshold(x, tau, ste=False).backward(torch.ones_like(y))
    assert x.grad.tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0]]  # masked (eq. 12)


def test_threshold_linear_matches_the_mask_in_numpy(torch_device):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(4, 6, 16)), rng.normal(size=(8, 16))
    tau = 0.6
    for bits in (None, 1.58):
        got = qsparse_linear(torch.from_numpy(x).to(torch_device),
                             torch.from_numpy(w).to(torch_device), bits=bits,
                             tau=torch.tensor(tau, dtype=torch.float64, device=torch_device))
        # SPEC 11 with the reference quantizers: the mask |A(x)| > tau on A(x)
        a = dequantize(*absmax_quantize(x)) if bits else x
        w_hat = dequantize(*absmean_ternarize(w)) if bits else w
        expected = np.where(np.abs(a) > tau, a, 0) @ w_hat.T
        np.testing.assert_allclose(got.cpu().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_qsparse_linear_drops_into_an_nn_linear_model(torch_device):
    torch.manual_seed(0)
    dense = torch.nn.Linear(16, 8, bias=False).to(torch_device, torch.float64)
    layer = QSparseLinear.from_linear(dense, sparsity=0.5, bits=1.58)
    x = torch.randn(3, 16, dtype=torch.float64, device=torch_device)
    expected = sparse_linear_forward(x.cpu().numpy(), dense.weight.detach().cpu().numpy(),
                                     sparsity=0.5, bits=1.58)
    np.testing.assert_allclose(layer(x).detach().cpu().numpy(), expected, rtol=1e-12)
    assert "sparsity=0.5" in repr(layer)
    with pytest.raises(ValueError, match="bias must be False"):
        QSparseLinear(16, 8, bias=True)
    with pytest.raises(ValueError, match="has a bias"):
        QSparseLinear.from_linear(torch.nn.Linear(16, 8))


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=1.0), "sparsity must be in"),
    (dict(block=(3, 5)), "block M=5 must divide"),
    (dict(rescale="l1"), "rescale must be"),
    (dict(bits=2), "bits must be None"),
    (dict(k=17), "k must be in"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        QSparseLinear(16, 8, **kwargs)


def test_a_threshold_takes_no_topk_arguments():
    x, w = torch.ones(2, 4), torch.ones(3, 4)
    with pytest.raises(ValueError, match="threshold"):
        qsparse_linear(x, w, sparsity=0.5, tau=torch.tensor(0.1))


def _moe_reference(h, router, experts, top, linear):
    """SPEC 6's MoE written out per token in NumPy (float64), with the oracle's GLU layers."""
    z = h @ router.T
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(h)
    counts = np.zeros(len(experts))
    for n in range(len(h)):
        chosen = np.argsort(-p[n], kind="stable")[:top]  # ties: the lower index
        counts[chosen] += 1
        for e in chosen:
            up, gate, down = experts[e]
            u = sparse_linear_forward(h[n:n + 1], up, **linear)
            g = sparse_linear_forward(h[n:n + 1], gate, **linear)
            out[n] += p[n, e] * sparse_linear_forward(u * np.maximum(g, 0) ** 2, down,
                                                      **linear)[0]
    aux = len(experts) * np.sum(counts / len(h) / top * p.mean(0))
    return out, aux


@pytest.mark.parametrize("top", [1, 2])
def test_moe_matches_the_spec_per_token(torch_device, top):
    rng = np.random.default_rng(top)
    moe = MoE(8, 16, "relu2", 0.02, rng, torch.float64, n_experts=4, top=top)
    with torch.no_grad():  # weights large enough that every path carries a real signal
        for p in moe.parameters():
            p.mul_(30)
    moe = moe.to(torch_device)
    h = rng.normal(size=(2, 5, 8))
    linear = dict(sparsity=0.5, bits=1.58)
    out, aux = moe(torch.from_numpy(h).to(torch_device), linear)
    weights = [tuple(getattr(e, n).detach().cpu().numpy() for n in ("up", "gate", "down"))
               for e in moe.experts]
    expected, expected_aux = _moe_reference(h.reshape(10, 8), moe.router.detach().cpu().numpy(),
                                            weights, top, linear)
    np.testing.assert_allclose(out.detach().cpu().numpy().reshape(10, 8), expected, rtol=1e-10,
                               atol=1e-12)
    assert abs(aux.item() - expected_aux) < 1e-12


def test_moe_gradients_match_finite_differences():
    """Gradients flow through the gates, the router and the experts; the choice is locally
    constant, so a float64 central difference checks them (SPEC 6)."""
    rng = np.random.default_rng(3)
    moe = MoE(4, 4, "silu", 0.02, rng, torch.float64, n_experts=3, top=2)
    h = torch.from_numpy(rng.normal(size=(6, 4)))
    names = [n for n, _ in moe.named_parameters()]
    weights = tuple(20 * p.detach() for p in moe.parameters())

    def loss(*ws):
        out, aux = torch.func.functional_call(moe, dict(zip(names, ws, strict=True)), (h, {}))
        return out.square().sum() + aux

    assert torch.autograd.gradcheck(loss, tuple(w.requires_grad_() for w in weights))


@pytest.mark.parametrize("act", ["relu2", "silu"])
@pytest.mark.parametrize("linear", [{}, dict(sparsity=0.5, rescale="l2"),
                                    dict(bits=1.58, block=(2, 4), ste=False)])
def test_glu_matches_the_oracle_ffn(torch_device, act, linear):
    rng = np.random.default_rng(0)
    glu = GLU(8, 16, act, 0.02, rng, torch.float64)
    with torch.no_grad():
        for p in glu.parameters():
            p.mul_(30)
    glu = glu.to(torch_device)
    h, grad_y = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 3, 8))
    x = torch.from_numpy(h).to(torch_device).requires_grad_()
    y = glu(x, linear)
    y.backward(torch.from_numpy(grad_y).to(torch_device))
    w = [getattr(glu, n).detach().cpu().numpy() for n in ("up", "gate", "down")]
    opts = {k: v for k, v in linear.items() if k != "ste"}
    got = [y.detach(), x.grad, glu.up.grad, glu.gate.grad, glu.down.grad]
    expected = [ffn_forward(h, *w, act=act, **opts),
                *ffn_backward(grad_y, h, *w, act=act, ste=linear.get("ste", True), **opts)]
    for name, ours, ref in zip(["y", "dh", "d_up", "d_gate", "d_down"], got, expected,
                               strict=True):
        mismatch = compare(name, ours.cpu().numpy(), ref, "reduction")
        assert mismatch is None, str(mismatch)


def test_glu_trace_records_inputs_before_quantization(torch_device):
    rng = np.random.default_rng(0)
    glu = GLU(8, 16, "relu2", 0.02, rng, torch.float32).to(torch_device)
    h = torch.randn(3, 8, device=torch_device)
    trace = {}
    glu(h, dict(bits=1.58, sparsity=0.5), trace=trace, name="blocks.0.ffn")
    assert list(trace) == ["blocks.0.ffn.up", "blocks.0.ffn.gate", "blocks.0.ffn.down"]
    np.testing.assert_array_equal(trace["blocks.0.ffn.up"][0], h.cpu().numpy())
    assert trace["blocks.0.ffn.down"][0].shape == (3, 16)
    assert trace["blocks.0.ffn.down"][1].shape == (3, 8)
