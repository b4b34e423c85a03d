"""Module / Parameter: SPEC-style dotted names, state dicts, and an MLP that learns."""

import numpy as np
import pytest

import minisparse.functions as F
from minisparse.nn import Module, Parameter
from minisparse.optim import AdamW


class Linear(Module):
    def __init__(self, d_in, d_out, rng):
        self.w = Parameter(rng.normal(0, d_in**-0.5, (d_out, d_in)).astype(np.float32))

    def forward(self, x):
        return x @ self.w.T


class Block(Module):
    def __init__(self, d, rng):
        self.norm = Parameter(np.ones(d, np.float32))
        self.ffn = Linear(d, d, rng)
        self.scratch = np.zeros(3)  # plain arrays and other attributes are not parameters


class Net(Module):
    def __init__(self, rng):
        self.tok_emb = Parameter(np.zeros((5, 2), np.float32))
        self.blocks = [Block(2, rng), Block(2, rng)]
        self.pair = (Parameter(np.zeros(1, np.float32)), Parameter(np.zeros(2, np.float32)))
        self.head = self.blocks[0].ffn  # shared module: its parameter is listed once
        self.norm = Parameter(np.ones(2, np.float32))


def test_named_parameters_are_dotted_in_definition_order():
    net = Net(np.random.default_rng(0))
    names = [name for name, _ in net.named_parameters()]
    assert names == ["tok_emb", "blocks.0.norm", "blocks.0.ffn.w", "blocks.1.norm",
                     "blocks.1.ffn.w", "pair.0", "pair.1", "norm"]
    assert net.parameters()[2] is net.blocks[0].ffn.w
    assert all(isinstance(p, Parameter) and p.requires_grad for p in net.parameters())


def test_zero_grad_and_state_dict_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    net, other = Net(rng), Net(rng)
    (net.blocks[1].ffn(np.ones((1, 2), np.float32))).sum().backward()
    assert net.blocks[1].ffn.w.grad is not None
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())

    np.savez(tmp_path / "w.npz", **net.state_dict())
    with np.load(tmp_path / "w.npz", allow_pickle=False) as saved:
        other.load_state_dict(dict(saved))
    for (name, p), (_, q) in zip(net.named_parameters(), other.named_parameters(), strict=True):
        np.testing.assert_array_equal(p.data, q.data, err_msg=name)
    state = net.state_dict()
    state["norm"][:] = 7  # a copy: editing the state leaves the model alone
    assert net.norm.data[0] == 1


def test_load_state_dict_errors_name_keys_and_shapes():
    net = Net(np.random.default_rng(0))
    state = net.state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['norm'\], unexpected keys \['nrom'\]"):
        net.load_state_dict({**{k: v for k, v in state.items() if k != "norm"},
                             "nrom": state["norm"]})
    with pytest.raises(ValueError, match=r"load_state_dict: tok_emb has shape \(2, 5\) in the "
                                         r"state but \(5, 2\) in the model"):
        net.load_state_dict({**state, "tok_emb": np.zeros((2, 5))})


class MLP(Module):
    def __init__(self, rng, hidden=16):
        self.fc1 = Linear(2, hidden, rng)
        self.fc2 = Linear(hidden, 2, rng)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_small_mlp_learns_xor_to_near_zero_loss():
    rng = np.random.default_rng(0)
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32) * 2 - 1
    y = np.array([0, 1, 1, 0])
    model = MLP(rng)
    opt = AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    for _ in range(300):
        loss = F.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        opt.step()
    assert loss.dtype == np.float32
    assert loss.item() < 1e-2
    assert (model(x).data.argmax(axis=1) == y).all()
