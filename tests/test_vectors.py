"""Golden vectors: versioned, deterministic .npz files that the reference reproduces exactly
and that the engine's own ops match within the tolerance table."""

import json

import numpy as np
import pytest

from minisparse.cli import main
from minisparse.linear import feed_forward, sparse_linear
from minisparse.oracle import (
    FORMAT_VERSION,
    compare,
    read_vector,
    sparse_linear_magnitudes,
    vectors,
    write_vectors,
)
from minisparse.quant import quantize_activations, ternarize_weights
from minisparse.sparsity import sparsify
from minisparse.tensor import Tensor


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors")
    return out, write_vectors(out)


def test_one_file_per_case_and_a_readme(written):
    out, paths = written
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.txt", *(p.name for p in paths)])
    assert (out / "README.txt").read_text() == vectors.__doc__
    assert {read_vector(p)["op"] for p in paths} == {"topk", "absmax", "absmean",
                                                     "sparse_linear", "ffn"}
    names = {p.stem for p in paths}
    assert {"topk-ties_k5", "topk-block_16_32", "topk-masked", "absmax-half_steps",
            "sparse_linear-bits_topk", "ffn-silu_dense"} <= names


def test_deterministic_bytes(written, tmp_path):
    _, paths = written
    for again in write_vectors(tmp_path):
        assert again.read_bytes() == (paths[0].parent / again.name).read_bytes(), again.name


def test_format_loads_without_pickle(written):
    for path in written[1]:
        with np.load(path, allow_pickle=False) as data:
            assert int(data["format_version"]) == FORMAT_VERSION == 1
            params = json.loads(str(data["params"]))
            assert isinstance(params, dict)
            prefixes = {key.partition(".")[0] for key in data.files}
            assert prefixes == {"format_version", "op", "params", "input", "output", "grad"}
            assert data["input.grad_y"].dtype in (np.float32, np.float64)
        for name, a in read_vector(path)["outputs"].items():
            assert a.dtype == (np.int8 if name in ("q", "t") else bool if name == "mask"
                               else read_vector(path)["inputs"]["grad_y"].dtype), (path, name)


def test_reference_reproduces_every_vector_exactly(written):
    for path in written[1]:
        v = read_vector(path)
        outputs, grads = vectors.compute(v["op"], v["params"], v["inputs"])
        for stored, fresh in ((v["outputs"], outputs), (v["grads"], grads)):
            assert stored.keys() == fresh.keys()
            for name in stored:
                np.testing.assert_array_equal(fresh[name], stored[name], err_msg=f"{path} {name}")


def _engine(op, params, inputs):
    """The engine's autograd ops (NumPy backend) on one vector -> (outputs, grads)."""
    ts = {k: Tensor(a, requires_grad=True) for k, a in inputs.items() if k != "grad_y"}
    if op == "topk":
        out = sparsify(ts["x"], **params)  # block comes as a JSON list [N, M]: fine
    elif op == "absmax":
        out = quantize_activations(ts["x"])
    elif op == "absmean":
        out = ternarize_weights(ts["w"])
    elif op == "sparse_linear":
        out = sparse_linear(ts["x"], ts["w"], backend="numpy", **params)
    else:
        out = feed_forward(*(ts[n] for n in ("h", "up", "gate", "down")), backend="numpy",
                           **params)
    out.backward(inputs["grad_y"])
    return out.data, {k: t.grad for k, t in ts.items()}


def test_engine_ops_match_the_vectors(written):
    for path in written[1]:
        v = read_vector(path)
        y, grads = _engine(v["op"], v["params"], v["inputs"])
        expected = v["outputs"].get("y")
        if v["op"] == "absmax":  # the op's output is the dequantized value q / s
            expected = v["outputs"]["q"] / v["outputs"]["s"]
        elif v["op"] == "absmean":
            expected = v["outputs"]["t"] / v["outputs"]["s"]
        scales = (None, {})
        if v["op"] == "sparse_linear":
            sy, sx, sw = sparse_linear_magnitudes(v["inputs"]["grad_y"], v["inputs"]["x"],
                                                  v["inputs"]["w"], **v["params"])
            scales = (sy, {"x": sx, "w": sw})
        assert compare("y", y, expected, "reduction", scales[0]) is None, path.name
        for name, g in grads.items():
            assert compare(f"grad.{name}", g, v["grads"][name], "reduction",
                           scales[1].get(name)) is None, (path.name, name)
        if "y_int" in v["outputs"]:  # the integer-code form agrees with the float form
            assert compare("y_int", v["outputs"]["y_int"], expected, "reduction",
                           scales[0]) is None, path.name


def test_read_vector_rejects_another_format_version(written, tmp_path):
    with np.load(written[1][0], allow_pickle=False) as data:
        arrays = dict(data)
    arrays["format_version"] = np.array(2)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(ValueError, match="format_version 2.*reads 1"):
        read_vector(tmp_path / "future.npz")


def test_cli_vectors(tmp_path, capsys):
    assert main(["vectors", str(tmp_path / "out"), "--seed", "3"]) == 0
    assert "wrote 20 golden vectors" in capsys.readouterr().out
    assert (tmp_path / "out" / "README.txt").exists()
    assert len(list((tmp_path / "out").glob("*.npz"))) == 20
