"""minisparse.torch.GPT as a module: SPEC 6 names, the engine's init, MoE and threshold
configs, and that minisparse itself never needs torch."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (the torch extra)")

from minisparse.model import GPT as EngineGPT  # noqa: E402
from minisparse.model import GPTConfig, param_shapes  # noqa: E402
from minisparse.torch import GPT  # noqa: E402

BASE = dict(vocab_size=11, context=8, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32)


def test_state_dict_has_the_spec_names_and_the_engines_init():
    model = GPT(BASE, np.random.default_rng(5))
    engine = EngineGPT(GPTConfig.from_dict(BASE), np.random.default_rng(5))
    ours = {n: t.numpy() for n, t in model.state_dict().items()}
    shapes = {n: tuple(a.shape) for n, a in ours.items()}
    assert shapes == param_shapes(GPTConfig.from_dict(BASE))
    for name, a in engine.state_dict().items():
        np.testing.assert_array_equal(ours[name], a, err_msg=name)  # same seed, same weights


def test_moe_and_threshold_names_and_loss():
    c = {**BASE, "ffn": "moe", "n_experts": 3, "top_experts": 2, "sparsify": "threshold",
         "sparsity": 0.5}
    model = GPT(c, np.random.default_rng(0))
    names = list(model.state_dict())
    assert "blocks.1.ffn.router" in names and "blocks.1.ffn.experts.2.down" in names
    assert all(f"blocks.0.tau.{t}" in names for t in ("attn_in", "attn_o", "ffn_in", "ffn_down"))
    assert not any(".tau." in n for n, _ in model.named_parameters())  # never trained
    assert model.state_dict()["blocks.0.ffn.experts.1.up"].shape == (32, 16)
    idx = torch.from_numpy(np.random.default_rng(1).integers(0, 11, (2, 8)))
    aux = []  # each layer's load-balancing loss, as its MoE returns it
    for block in model.blocks:
        block.ffn.register_forward_hook(lambda module, args, out: aux.append(out[1].item()))
    trace = {}
    logits, loss = model(idx, idx, trace=trace)
    ce = torch.nn.functional.cross_entropy(logits.reshape(16, -1), idx.reshape(-1))
    assert len(aux) == 2 and min(aux) > 0
    assert loss.item() == pytest.approx(ce.item() + 0.01 * np.mean(aux), rel=1e-6)  # SPEC 6
    assert any(".ffn.experts." in n for n in trace)
    with torch.no_grad():  # tau = 0 keeps every nonzero: thresholds decide the mask
        model.blocks[0].tau.attn_in.fill_(1e9)
    trace2 = {}
    model(idx, trace=trace2)
    assert np.all(trace2["blocks.0.attn.q"][1] == 0)  # everything dropped by |x| > tau


@pytest.mark.parametrize("bad, match", [
    ({"ffn": "moe"}, "n_experts must be"),
    ({"n_experts": 2}, 'are for ffn "moe"'),
    ({"sparsify": "threshold", "rescale": "l2"}, "rescale"),
    ({"sparsify": "tophat"}, "sparsify must be"),
    ({"moe_aux": -1}, "moe_aux"),
    ({"dropout": 0.1}, "unknown config keys"),
])
def test_bad_config_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        GPT({**BASE, **bad})


def test_load_spec_state_dict_names_the_bad_key():
    model = GPT(BASE, np.random.default_rng(0))
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"missing \['norm'\]"):
        model.load_spec_state_dict({k: v for k, v in state.items() if k != "norm"})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        model.load_spec_state_dict({**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"blocks.0.attn.q.*shape \(16, 8\)"):
        model.load_spec_state_dict({**state, "blocks.0.attn.q": torch.zeros(16, 8)})


def test_minisparse_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import minisparse, minisparse.cli, minisparse.oracle, minisparse.train\n"
            "assert minisparse.cli.main(['info', '--json']) == 0\n"
            "try:\n    import minisparse.torch\nexcept ImportError as e:\n    print('ok', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "ok" in out.stdout
