"""minisparse export / import: .npz -> .safetensors / .pt -> .npz is bit-identical, and a
file whose parameters do not fit its config is refused with one line naming the parameter."""

import json

import numpy as np
import pytest

from minisparse.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from minisparse.cli import main
from minisparse.model import GPT, GPTConfig

safetensors = pytest.importorskip("safetensors", reason="safetensors is not installed (the "
                                                        "torch extra)")

VOCAB = "\n !abcdefgh"


@pytest.fixture
def ckpt_path(tmp_path):
    config = GPTConfig(vocab_size=len(VOCAB), context=8, d_model=16, n_layers=2, n_heads=2,
                       sparsity=0.5, bits=1.58)
    model = GPT(config, np.random.default_rng(0))
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, Checkpoint(config, model.state_dict(), VOCAB, step=7,
                                     settings={"batch": 4}, data={"source": "<text>"}))
    return path


def _same(a: Checkpoint, b: Checkpoint):
    assert a.config == b.config and a.vocab == b.vocab and a.step == b.step
    assert a.settings == b.settings and a.data == b.data
    assert list(a.params) == list(b.params)
    for name in a.params:
        assert a.params[name].dtype == b.params[name].dtype
        assert a.params[name].tobytes() == b.params[name].tobytes(), name


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_is_bit_identical(ckpt_path, tmp_path, suffix, capsys):
    if suffix == ".pt":
        pytest.importorskip("torch", reason="PyTorch is not installed (the torch extra)")
    exported = tmp_path / f"model{suffix}"
    assert main(["export", str(ckpt_path), "--to", str(exported)]) == 0
    back = tmp_path / "back.npz"
    assert main(["import", str(exported), "--out", str(back)]) == 0
    _same(load_checkpoint(ckpt_path), load_checkpoint(back))
    assert main(["import", str(exported), "--out", str(back)]) == 1  # no silent overwrite
    assert "exists" in capsys.readouterr().err
    assert main(["import", str(exported), "--out", str(back), "--overwrite"]) == 0


def test_pt_loads_with_weights_only_into_the_torch_gpt(ckpt_path, tmp_path):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (the torch extra)")
    from minisparse.torch import GPT as TorchGPT

    out = tmp_path / "model.pt"
    main(["export", str(ckpt_path), "--to", str(out)])
    obj = torch.load(out, weights_only=True)
    model = TorchGPT(obj["config"])
    model.load_state_dict(obj["state_dict"])  # strict: every SPEC name, nothing else
    assert obj["vocab"] == VOCAB


def test_safetensors_metadata_is_json(ckpt_path, tmp_path):
    out = tmp_path / "model.safetensors"
    main(["export", str(ckpt_path), "--to", str(out)])
    with safetensors.safe_open(str(out), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "minisparse"
    assert json.loads(meta["vocab"]) == VOCAB
    assert json.loads(meta["config"])["bits"] == 1.58


def _rewrite(path, change):
    """Re-save a .safetensors export with its tensors changed by ``change(dict)``."""
    from safetensors.numpy import save_file

    with safetensors.safe_open(str(path), framework="numpy") as f:
        arrays, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(arrays)
    save_file(arrays, str(path), metadata=meta)


@pytest.mark.parametrize("change, named", [
    (lambda a: a.pop("blocks.1.ffn.down"), "missing ['blocks.1.ffn.down']"),
    (lambda a: a.update(extra=np.zeros(3, np.float32)), "unexpected ['extra']"),
    (lambda a: a.update({"norm": np.ones(17, np.float32)}), "params['norm'] has shape (17,)"),
])
def test_a_bad_parameter_is_refused_in_one_line(ckpt_path, tmp_path, capsys, change, named):
    out = tmp_path / "model.safetensors"
    main(["export", str(ckpt_path), "--to", str(out)])
    _rewrite(out, change)
    assert main(["import", str(out), "--out", str(tmp_path / "x.npz")]) == 1
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("to, match", [("model.bin", "--to must end in"),
                                       ("model.gguf", "llama architecture")])
def test_export_names_what_it_cannot_write(ckpt_path, tmp_path, capsys, to, match):
    if to.endswith(".gguf"):  # the fixture is a relu2 model, which llama.cpp cannot run
        pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    assert main(["export", str(ckpt_path), "--to", str(tmp_path / to)]) == 1
    assert match in capsys.readouterr().err


def test_import_refuses_a_file_without_minisparse_metadata(tmp_path, capsys):
    from safetensors.numpy import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(path))
    assert main(["import", str(path), "--out", str(tmp_path / "x.npz")]) == 1
    assert "no minisparse metadata" in capsys.readouterr().err
