"""Golden vectors: versioned, deterministic .npz files that the reference reproduces exactly
and that the engine's own ops match within the tolerance table."""

import json
from pathlib import Path

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
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.txt", "SPEC.md",
                                                            *(p.name for p in paths)])
    assert (out / "README.txt").read_text() == vectors.__doc__
    spec = Path(vectors.__file__).with_name("SPEC.md").read_text()
    assert (out / "SPEC.md").read_text() == spec and "## 10. The functional oracle" in spec
    assert {read_vector(p)["op"] for p in paths} == {"topk", "absmax", "absmean",
                                                     "sparse_linear", "ffn", "gpt"}
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
            assert int(data["format_version"]) == FORMAT_VERSION == 2
            params = json.loads(str(data["params"]))
            assert isinstance(params, dict)
            prefixes = {key.partition(".")[0] for key in data.files}
            assert prefixes == {"format_version", "op", "params", "input", "output", "grad"}
            if str(data["op"]) == "gpt":
                continue
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
        if v["op"] == "gpt":  # the whole model: test_the_model_vector_stands_alone
            continue
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
    arrays["format_version"] = np.array(3)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(ValueError, match="format_version 3.*reads 2"):
        read_vector(tmp_path / "future.npz")


def test_cli_vectors(tmp_path, capsys):
    assert main(["vectors", str(tmp_path / "out"), "--seed", "3"]) == 0
    assert "wrote 22 golden vectors" in capsys.readouterr().out
    assert (tmp_path / "out" / "README.txt").exists()
    assert len(list((tmp_path / "out").glob("*.npz"))) == 22


def test_the_model_vector_stands_alone(written):
    # everything to check a whole model: params, idx, targets, logits, loss, grads and the
    # input and output of every projection in execution order (SPEC 10)
    from minisparse.model import GPT, GPTConfig

    for path in [p for p in written[1] if p.stem.startswith("gpt-")]:
        v = read_vector(path)
        params = {k[len("param."):]: a for k, a in v["inputs"].items() if k.startswith("param.")}
        assert set(v["grads"]) == set(params) and v["outputs"]["loss"].shape == ()
        traced = [k for k in v["outputs"] if k.startswith("trace.")]
        assert traced[:2] == ["trace.blocks.0.attn.q.input", "trace.blocks.0.attn.q.output"]
        assert len([k for k in traced if ".experts." not in k]) == 2 * (
            4 * 2 + (3 * 2 if v["params"]["config"].get("ffn", "glu") == "glu" else 0))
        try:
            config = GPTConfig(**v["params"]["config"])
        except (TypeError, ValueError):
            continue  # the engine takes MoE after issue 12's branch lands
        model = GPT.from_params(config, params, backend="numpy")
        logits, loss = model(v["inputs"]["idx"], v["inputs"]["targets"])
        loss.backward()
        scale = np.abs(v["outputs"]["logits"]).max()
        assert compare("logits", logits.data, v["outputs"]["logits"], "reduction", scale) is None
        assert abs(loss.item() - float(v["outputs"]["loss"])) <= 1e-12 * max(1, loss.item())
        for name, p in model.named_parameters():
            assert compare(name, p.grad, v["grads"][name], "reduction") is None, name


def test_readme_states_the_tolerance_table():
    from minisparse.oracle import TOLERANCES

    for kind in ("elementwise", "reduction"):
        line = next(li for li in vectors.__doc__.splitlines() if li.strip().startswith(kind))
        numbers = [float(t) for t in line.split()[-2:]]
        assert numbers == [TOLERANCES["float32"][kind].rtol, TOLERANCES["float64"][kind].rtol]
