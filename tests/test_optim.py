"""AdamW against a hand-written reference (and torch when present), the SPEC section 9
schedule, and global gradient-norm clipping."""

import math

import numpy as np
import pytest

from minisparse.nn import Parameter
from minisparse.optim import AdamW, clip_grad_norm, lr_at

HYPER = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8}


def make_params(rng):
    return [Parameter(rng.standard_normal((3, 4))), Parameter(rng.standard_normal(4))]


def reference_adamw(p, grads, lr, b1, b2, eps, wd):
    """Decoupled AdamW written out the textbook way, float64."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return p


def run(opt, params, grads):
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.copy()
        opt.step()


def test_adamw_matches_reference_with_param_groups():
    rng = np.random.default_rng(0)
    params = make_params(rng)
    start = [p.data.copy() for p in params]
    grads = [[rng.standard_normal(p.shape) for p in params] for _ in range(6)]
    opt = AdamW([{"params": [params[0]], "weight_decay": 0.1},
                 {"params": [params[1]], "weight_decay": 0.0, "lr": 3e-2}], **HYPER)
    run(opt, params, grads)
    for i, (wd, lr) in enumerate([(0.1, 1e-2), (0.0, 3e-2)]):
        expected = reference_adamw(start[i], [g[i] for g in grads], lr, 0.9, 0.99, 1e-8, wd)
        np.testing.assert_allclose(params[i].data, expected, rtol=1e-12, atol=1e-14)


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    params = make_params(rng)
    tparams = [torch.tensor(p.data.copy(), requires_grad=True) for p in params]
    groups = [{"weight_decay": 0.1}, {"weight_decay": 0.0}]
    opt = AdamW([{"params": [p], **g} for p, g in zip(params, groups, strict=True)], **HYPER)
    topt = torch.optim.AdamW([{"params": [p], **g} for p, g in zip(tparams, groups, strict=True)],
                             **HYPER)
    for _ in range(5):
        grads = [rng.standard_normal(p.shape) for p in params]
        run(opt, params, [grads])
        for tp, g in zip(tparams, grads, strict=True):
            tp.grad = torch.tensor(g)
        topt.step()
    for p, tp in zip(params, tparams, strict=True):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_adamw_state_dict_resume_is_exact(tmp_path):
    rng = np.random.default_rng(2)
    a, b = make_params(rng), make_params(np.random.default_rng(2))
    grads = [[rng.standard_normal(p.shape) for p in a] for _ in range(6)]
    straight = AdamW(a, **HYPER)
    run(straight, a, grads)

    first = AdamW(b, **HYPER)
    run(first, b, grads[:3])
    np.savez(tmp_path / "opt.npz", **first.state_dict())
    resumed = AdamW(b, **HYPER)
    with np.load(tmp_path / "opt.npz", allow_pickle=False) as saved:
        resumed.load_state_dict(dict(saved))
    run(resumed, b, grads[3:])
    for p, q in zip(a, b, strict=True):
        np.testing.assert_array_equal(p.data, q.data)


def test_adamw_keeps_float32_and_skips_params_without_grad():
    p = Parameter(np.ones(3, np.float32))
    idle = Parameter(np.ones(2, np.float32))
    opt = AdamW([p, idle], lr=0.1, weight_decay=0.1)
    p.grad = np.ones(3, np.float32)
    opt.step()
    assert p.data.dtype == np.float32 and opt.state[0]["m"].dtype == np.float32
    np.testing.assert_array_equal(idle.data, [1, 1])
    assert 1 not in opt.state


def test_adamw_errors():
    p = Parameter(np.ones(3))
    with pytest.raises(ValueError, match=r"AdamW: unknown group keys \['weight_decy'\]"):
        AdamW([{"params": [p], "weight_decy": 0.1}])
    opt = AdamW([p])
    with pytest.raises(ValueError, match=r"AdamW.load_state_dict: m.0 \(2,\) / v.0 \(3,\) do not "
                                         r"match parameter 0 \(3,\)"):
        opt.load_state_dict({"m.0": np.zeros(2), "v.0": np.zeros(3), "step.0": 1})
    with pytest.raises(ValueError, match=r"unexpected key 'm.5' for 1 parameters"):
        opt.load_state_dict({"m.5": np.zeros(3)})


def test_lr_at_follows_spec_section_9():
    kw = {"max_iters": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup": 100}
    assert lr_at(0, **kw) == pytest.approx(1e-3 * 1 / 101)
    assert lr_at(99, **kw) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, **kw) == pytest.approx(1e-3)  # cosine starts at the peak
    mid = 100 + (1999 - 100) / 2
    assert lr_at(mid, **kw) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert lr_at(1999, **kw) == pytest.approx(1e-4)  # the last step reaches min_lr
    assert lr_at(5000, **kw) == pytest.approx(1e-4)
    rates = [lr_at(it, **kw) for it in range(100, 2000)]
    assert (np.diff(rates) <= 0).all()  # monotone decay after warm-up
    assert lr_at(0, max_iters=1, lr=1.0, min_lr=0.1, warmup=0) == 0.1
    with pytest.raises(ValueError, match=r"lr_at: need .* got it=-1"):
        lr_at(-1, **kw)


def test_clip_grad_norm_is_global():
    a, b = Parameter(np.zeros(2)), Parameter(np.zeros(1))
    a.grad, b.grad = np.array([3.0, 0.0]), np.array([4.0])
    untouched = Parameter(np.zeros(1))  # no grad: ignored
    assert clip_grad_norm([a, b, untouched], 10.0) == pytest.approx(5.0)
    np.testing.assert_array_equal(a.grad, [3.0, 0.0])  # under the limit: unchanged
    assert clip_grad_norm([a, b], 1.0) == pytest.approx(5.0)
    clipped = math.sqrt(float((a.grad**2).sum() + (b.grad**2).sum()))
    assert clipped == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(a.grad / b.grad[0], [0.75, 0.0])  # direction kept
