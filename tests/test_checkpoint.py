import json
import zipfile

import numpy as np
import pytest

from minisparse import checkpoint as ckpt_mod
from minisparse.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from minisparse.model import GPTConfig, param_shapes

CONFIG = GPTConfig(vocab_size=5, context=8, d_model=16, n_layers=2, n_heads=2, sparsity=0.5)


def make_checkpoint(seed=0) -> Checkpoint:
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in param_shapes(CONFIG).items()}
    optimizer = {}
    for i, a in enumerate(params.values()):  # AdamW.state_dict() layout
        optimizer[f"m.{i}"], optimizer[f"v.{i}"], optimizer[f"step.{i}"] = a * 0.1, a * a, 7
    rng.integers(0, 10, size=3)  # move the generator off its seed state
    return Checkpoint(config=CONFIG, params=params, vocab="abcde", step=7, optimizer=optimizer,
                      rng_state=rng.bit_generator.state, settings={"iters": 10, "lr": 1e-3},
                      data={"source": "tinyshakespeare", "sha256": "0" * 64},
                      history={"train_loss": [2.5, 2.25], "val_loss": [[2, 2.4]]})


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt.npz"
    ckpt = make_checkpoint()
    save_checkpoint(path, ckpt)
    return path, ckpt


def rewrite(path, edit):
    """Re-save the archive after ``edit(arrays)``, with a checksum that matches again."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    arrays.pop("checksum")
    arrays["checksum"] = np.array(ckpt_mod._checksum(arrays))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def edit_meta(arrays, fn):
    meta = json.loads(str(arrays["meta"]))
    fn(meta)
    arrays["meta"] = np.array(json.dumps(meta))


def test_round_trip_is_exact(saved):
    path, ckpt = saved
    back = load_checkpoint(path)
    assert back.config == CONFIG and back.vocab == "abcde" and back.step == 7
    assert list(back.params) == list(param_shapes(CONFIG))
    for name, a in ckpt.params.items():
        assert back.params[name].dtype == np.float32
        np.testing.assert_array_equal(back.params[name], a)
    assert back.optimizer.keys() == ckpt.optimizer.keys()
    for key, value in ckpt.optimizer.items():
        np.testing.assert_array_equal(back.optimizer[key], value)
    assert back.settings == ckpt.settings and back.data == ckpt.data
    assert back.history == ckpt.history
    # the generator continues exactly where it was (PCG64 state ints exceed int64)
    rng = np.random.default_rng()
    rng.bit_generator.state = back.rng_state
    expected = np.random.default_rng()
    expected.bit_generator.state = ckpt.rng_state
    assert rng.integers(0, 2**62, size=5).tolist() == expected.integers(0, 2**62, size=5).tolist()


def test_block_config_round_trips(tmp_path):
    config = GPTConfig(vocab_size=5, context=8, d_model=16, n_layers=1, n_heads=2, block=(4, 8),
                       bits=1.58, ffn_act="silu", rescale="l2")
    ckpt = make_checkpoint()
    ckpt.config = config
    ckpt.params = {n: np.zeros(s, np.float32) for n, s in param_shapes(config).items()}
    save_checkpoint(tmp_path / "c.npz", ckpt)
    assert load_checkpoint(tmp_path / "c.npz").config == config


def test_file_is_plain_arrays_under_spec_names(saved):
    path, _ = saved
    with np.load(path, allow_pickle=False) as z:  # would raise on any pickled object
        files = set(z.files)
        assert all(z[k].dtype != object for k in files)
    assert {f"param/{n}" for n in param_shapes(CONFIG)} <= files
    assert {"meta", "checksum", "optim/m.0", "optim/v.0"} <= files
    meta = json.loads(str(np.load(path)["meta"]))
    assert meta["format_version"] == ckpt_mod.FORMAT_VERSION
    assert meta["config"]["sparsity"] == 0.5


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.npz")


def test_not_a_zip(tmp_path):
    path = tmp_path / "ckpt.npz"
    path.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="not an .npz zip archive"):
        load_checkpoint(path)


@pytest.mark.parametrize("fraction", [0.3, 0.7, 0.98])
def test_truncated_file_is_refused(saved, fraction):
    path, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(CheckpointError, match="corrupt or truncated|not an .npz"):
        load_checkpoint(path)


def test_altered_byte_is_refused(saved):
    path, _ = saved
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("param/blocks.0.attn.q.npy")
    raw[info.header_offset + 200] ^= 0x40  # inside the array data (zip CRC catches it)
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_altered_array_with_valid_zip_fails_checksum(saved):
    path, _ = saved
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["param/norm"] = arrays["param/norm"] + 1
    with open(path, "wb") as f:
        np.savez(f, **arrays)  # a perfectly valid zip with the old checksum
    with pytest.raises(CheckpointError, match="fails its checksum"):
        load_checkpoint(path)


def test_wrong_shape_is_named(tmp_path):
    ckpt = make_checkpoint()
    ckpt.params["blocks.1.ffn.up"] = np.zeros((3, 16), np.float32)
    save_checkpoint(tmp_path / "c.npz", ckpt)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.up.*\(3, 16\)"):
        load_checkpoint(tmp_path / "c.npz")


def test_wrong_dtype_is_named(tmp_path):
    ckpt = make_checkpoint()
    ckpt.params["norm"] = np.ones(16, np.int32)
    save_checkpoint(tmp_path / "c.npz", ckpt)
    with pytest.raises(CheckpointError, match=r"norm.*int32"):
        load_checkpoint(tmp_path / "c.npz")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    ckpt = make_checkpoint()
    del ckpt.params["norm"]
    ckpt.params["head"] = np.zeros((5, 16), np.float32)
    save_checkpoint(tmp_path / "c.npz", ckpt)
    with pytest.raises(CheckpointError, match=r"missing \['norm'\].*unexpected \['head'\]"):
        load_checkpoint(tmp_path / "c.npz")


def test_stray_entry_is_refused(saved):
    path, _ = saved
    rewrite(path, lambda a: a.update(extra=np.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected entries \['extra'\]"):
        load_checkpoint(path)


def test_missing_optimizer_array_is_named(saved):
    path, _ = saved
    rewrite(path, lambda a: a.pop("optim/v.3"))
    with pytest.raises(CheckpointError, match="optim/v.3"):
        load_checkpoint(path)


def test_format_version_is_checked(saved):
    path, _ = saved
    rewrite(path, lambda a: edit_meta(a, lambda m: m.update(format_version=99)))
    with pytest.raises(CheckpointError, match="format version 99, expected 1"):
        load_checkpoint(path)


def test_config_mismatch_is_named(saved):
    path, _ = saved
    rewrite(path, lambda a: edit_meta(a, lambda m: m["config"].update(d_model=32)))
    with pytest.raises(CheckpointError, match=r"tok_emb.*\(5, 16\).*\(5, 32\)"):
        load_checkpoint(path)
    rewrite(path, lambda a: edit_meta(a, lambda m: m["config"].update(colour="blue")))
    with pytest.raises(CheckpointError, match="invalid config.*colour"):
        load_checkpoint(path)


def test_vocab_must_match_config(saved):
    path, _ = saved
    rewrite(path, lambda a: edit_meta(a, lambda m: m.update(vocab="abc")))
    with pytest.raises(CheckpointError, match="vocab_size 5 does not match.*3 characters"):
        load_checkpoint(path)


def test_failed_write_keeps_old_file_and_leaves_no_temp(saved, monkeypatch):
    path, ckpt = saved
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_checkpoint(seed=1))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.npz"]
    monkeypatch.undo()
    save_checkpoint(path, make_checkpoint(seed=1))  # a later save replaces the file
    assert load_checkpoint(path).params["norm"].tolist() != ckpt.params["norm"].tolist()


# --- hostile files: bounded loading, malformed meta, corrupt zip directories ---------------


def _npy(shape, dtype="<f4", data=b"") -> bytes:
    import io
    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        f, {"descr": dtype, "fortran_order": False, "shape": shape})
    return f.getvalue() + data


def _replace_member(path, name, payload, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    members[name] = payload
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b, compress_type=compress if n == name else zipfile.ZIP_STORED)


def _peak_bytes(fn):
    import tracemalloc
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _refusal(path):
    """(the CheckpointError's message, peak traced bytes while loading ``path``)."""
    messages = []

    def load():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        messages.append(str(e.value))

    peak = _peak_bytes(load)
    return messages[0], peak


def test_header_declaring_huge_array_is_refused_before_reading(saved):
    path, _ = saved
    _replace_member(path, "param/tok_emb.npy", _npy((10**12,), data=b"\0" * 64))
    message, peak = _refusal(path)
    assert "tok_emb.npy' declares 4,000,000,000,000 bytes" in message
    assert peak < 8 * 2**20


def test_arrays_beyond_what_the_config_implies_are_refused(saved):
    path, _ = saved
    # 64 MB of zeros deflate to ~64 KB: physically possible, but far more than the config's
    # parameters and moments (a few KB) -- refused before the data is decompressed
    _replace_member(path, "optim/m.0.npy", _npy((2**24,), data=bytes(2**26)),
                    compress=zipfile.ZIP_DEFLATED)
    message, peak = _refusal(path)
    assert "more than its config implies" in message
    assert peak < 8 * 2**20


def test_deflate_bomb_is_refused_with_bounded_memory(saved):
    path, _ = saved
    header = _npy(param_shapes(CONFIG)["norm"])  # declares 16 floats = 64 bytes
    _replace_member(path, "param/norm.npy", header + bytes(2**26), compress=zipfile.ZIP_DEFLATED)
    message, peak = _refusal(path)
    assert "more data than its header declares" in message
    assert peak < 8 * 2**20


def test_loading_peaks_near_the_arrays_size(tmp_path):
    config = GPTConfig(vocab_size=5, context=8, d_model=128, n_layers=2, n_heads=2)
    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal(s).astype(np.float32)
              for n, s in param_shapes(config).items()}
    optimizer = {}
    for i, a in enumerate(params.values()):
        optimizer[f"m.{i}"], optimizer[f"v.{i}"], optimizer[f"step.{i}"] = a, a * a, 1
    save_checkpoint(tmp_path / "c.npz", Checkpoint(config, params, "abcde", 1, optimizer))
    arrays = 3 * sum(a.nbytes for a in params.values())
    peak = _peak_bytes(lambda: load_checkpoint(tmp_path / "c.npz"))
    assert peak < 2 * arrays + 50 * 2**20


def test_zip_directory_corruption_is_one_clear_error(saved):
    path, _ = saved
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        start = max(i.header_offset for i in z.infolist())  # the last member, then the directory
    rng = np.random.default_rng(0)
    for pos in rng.choice(np.arange(start, len(raw)), size=150, replace=False):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(raw)
            bad[pos] ^= flip
            path.write_bytes(bytes(bad))
            try:
                load_checkpoint(path)
            except CheckpointError:
                pass


MALFORMED_META = [
    lambda m: m.update(step="3"), lambda m: m.update(step=-1), lambda m: m.update(step=1.5),
    lambda m: m.update(step=True), lambda m: m.update(vocab=5), lambda m: m.update(config=None),
    lambda m: m.update(config=[1, 2]), lambda m: m["config"].update(d_model="x"),
    lambda m: m["config"].update(context=None), lambda m: m.update(settings=[1]),
    lambda m: m.update(data=[]), lambda m: m.update(data={"source": 5}),
    lambda m: m.update(history=[]), lambda m: m.update(history={"train_loss": "x"}),
    lambda m: m.update(history={"val_loss": [[1]]}), lambda m: m.update(rng_state={}),
    lambda m: m.update(rng_state="x"), lambda m: m.update(rng_state={"bit_generator": "PCG64"}),
    lambda m: m.update(rng_state={"bit_generator": "Generator", "state": {}}),
    lambda m: m.update(optimizer=[]), lambda m: m.update(optimizer={"m.0": "x"}),
    lambda m: m.update(optimizer={"m.0": {"__array__": ["x"]}}),
    lambda m: m.update(optimizer={"m.0": {"__array__": "param/norm"}}),
    lambda m: m.update(format_version="1"), lambda m: m.pop("config"),
]


@pytest.mark.parametrize("edit", MALFORMED_META)
def test_malformed_meta_with_valid_checksum_is_a_checkpoint_error(saved, edit):
    path, _ = saved
    rewrite(path, lambda a: edit_meta(a, edit))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@pytest.mark.parametrize("meta", ["[1, 2]", "[" * 100_000, "null", "{\"format_version\": 1"])
def test_meta_that_is_not_an_object_is_a_checkpoint_error(saved, meta):
    path, _ = saved
    rewrite(path, lambda a: a.update(meta=np.array(meta)))
    with pytest.raises(CheckpointError, match="meta"):
        load_checkpoint(path)


def test_file_mode_follows_the_umask_and_stale_temps_are_removed(tmp_path):
    import os
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "c.npz", make_checkpoint())
    finally:
        os.umask(old)
    assert (tmp_path / "c.npz").stat().st_mode & 0o777 == 0o640
    stale = tmp_path / ".c.npz.12345.abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert ckpt_mod.remove_stale_temps(tmp_path / "c.npz") == [stale.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]


def test_a_config_of_absurd_size_is_refused_quickly(saved):
    path, _ = saved
    rewrite(path, lambda a: edit_meta(a, lambda m: m["config"].update(n_layers=10**18)))
    with pytest.raises(CheckpointError, match="config implies 9,000,000,000,000,000,00"):
        load_checkpoint(path)  # param_shapes would list 9e18 names: hours, then out of memory
