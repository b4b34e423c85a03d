"""Checkpoints: one ``.npz`` file, written atomically, loaded with ``allow_pickle=False``.

Layout of the archive (every entry is a plain array; nothing is pickled):

- ``param/<name>``  model parameters under the SPEC section 6 names (``param/tok_emb``,
  ``param/blocks.0.attn.q``, ...);
- ``optim/<path>``  the arrays of the optimizer's ``state_dict()`` (its non-array parts live
  in the meta JSON, with ``{"__array__": "optim/<path>"}`` where an array was);
- ``meta``          a JSON string: format version, model config, tokenizer vocabulary, step,
  RNG state (``bit_generator.state``; PCG64's ints exceed int64, so JSON), train settings,
  data source and loss history;
- ``checksum``      sha256 over every other entry (name, dtype, shape, bytes), so a silent
  alteration is caught even where the zip CRC is rewritten.

Loading is bounded: the zip directory and every ``.npy`` header are read first, and a file
whose arrays declare more bytes than its config implies (parameters + two AdamW moments) is
refused before any array data is read; each member is then read in chunks and refused as soon
as more comes out than its header declared (no deflate bomb), so loading peaks at about the
arrays' own size.
"""

import dataclasses
import hashlib
import json
import math
import os
import secrets
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .model import GPTConfig, check_params, param_shapes

FORMAT_VERSION = 1
MAX_META_BYTES = 64 * 2**20  # the meta JSON as a numpy unicode array (4 bytes per character)
DEFLATE_MAX_RATIO = 1100  # deflate expands at most ~1032:1; more declared is a lie
CHUNK = 2**20  # bytes read from a zip member at a time


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt or does not match its config."""


@dataclass
class Checkpoint:
    """Everything needed to sample from a model or continue training it bit-identically."""

    config: GPTConfig
    params: dict  # SPEC parameter name -> ndarray
    vocab: str  # CharTokenizer.vocab
    step: int = 0  # training steps completed
    optimizer: dict | None = None  # optimizer state_dict()
    rng_state: dict | None = None  # np.random.Generator.bit_generator.state
    settings: dict = field(default_factory=dict)  # train settings (JSON-able)
    data: dict = field(default_factory=dict)  # data source, e.g. {"source": ..., "sha256": ...}
    history: dict = field(default_factory=dict)  # loss history (JSON-able)


def _split_arrays(obj, prefix: str, arrays: dict):
    """Nested dicts/lists -> a JSON-able skeleton; ndarray leaves move into ``arrays``."""
    if isinstance(obj, np.ndarray):
        arrays[prefix] = obj
        return {"__array__": prefix}
    if isinstance(obj, dict):
        return {str(k): _split_arrays(v, f"{prefix}/{k}", arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_arrays(v, f"{prefix}/{i}", arrays) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _join_arrays(obj, arrays: dict):
    """Inverse of ``_split_arrays``."""
    if isinstance(obj, dict):
        if set(obj) == {"__array__"}:
            key = obj["__array__"]
            if not isinstance(key, str) or key not in arrays:
                raise CheckpointError(f"missing optimizer array {key!r}")
            return arrays[key]
        return {k: _join_arrays(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_arrays(v, arrays) for v in obj]
    return obj


def _checksum(arrays: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8))  # the raw bytes, without a copy
    return h.hexdigest()


def save_checkpoint(path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically: temp file in the same directory, fsync, rename,
    fsync the directory. The file gets the umask's permissions, like any file the user creates.

    On any failure the temp file is removed and an existing ``path`` is left untouched.
    """
    path = Path(path)
    arrays = {f"param/{name}": np.asarray(a) for name, a in ckpt.params.items()}
    optim = None if ckpt.optimizer is None else _split_arrays(ckpt.optimizer, "optim", arrays)
    meta = {
        "format_version": FORMAT_VERSION,
        "config": ckpt.config.to_dict(),
        "vocab": ckpt.vocab,
        "step": int(ckpt.step),
        "optimizer": optim,
        "rng_state": ckpt.rng_state,
        "settings": ckpt.settings,
        "data": ckpt.data,
        "history": ckpt.history,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    arrays["checksum"] = np.array(_checksum(arrays))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform that cannot open directories: nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename still holds
        pass
    finally:
        os.close(fd)


def remove_stale_temps(path) -> list:
    """Delete the temp files an interrupted ``save_checkpoint(path)`` (e.g. SIGKILL between
    write and rename) left next to ``path``; returns their names. Call it only while no other
    process writes ``path`` (train holds the output directory's lock)."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return [p.name for p in stale]


def _npy_header(f, name: str):
    """(shape, dtype, fortran_order) from the header of the .npy stream ``f``."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise CheckpointError(f"entry {name!r} has .npy format version {version}")
    if dtype.hasobject:
        raise CheckpointError(f"entry {name!r} holds Python objects; a checkpoint never does")
    return shape, dtype, fortran


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, shape, dtype, fortran):
    """The array of one member, read in chunks into a preallocated buffer; more data than the
    header declared is refused at once (so a deflate bomb stops after one chunk)."""
    out = np.empty(shape[::-1] if fortran else shape, dtype)
    view = out.reshape(-1).view(np.uint8)
    with zf.open(info) as f:
        _npy_header(f, info.filename)
        pos = 0
        while pos < view.size:
            chunk = f.read(min(CHUNK, view.size - pos))
            if not chunk:
                raise CheckpointError(f"entry {info.filename!r} is shorter than its header says")
            view[pos:pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
            pos += len(chunk)
        if f.read(1):  # also reaches the end of the member, where zipfile checks the CRC
            raise CheckpointError(f"entry {info.filename!r} holds more data than its header "
                                  "declares")
    return out.T if fortran else out


def param_count(config: GPTConfig) -> tuple[int, int]:
    """(arrays, numbers) of ``config``'s parameters, in O(1) for any n_layers: what one layer
    adds, times n_layers, plus the rest (param_shapes would list every layer's arrays, which
    takes forever for an absurd n_layers)."""
    one, two = (param_shapes(dataclasses.replace(config, n_layers=n)) for n in (1, 2))
    numbers = [sum(math.prod(s) for s in shapes.values()) for shapes in (one, two)]
    layers = config.n_layers - 1
    return (len(one) + layers * (len(two) - len(one)),
            numbers[0] + layers * (numbers[1] - numbers[0]))


def _implied_bytes(config: GPTConfig) -> int:
    """The most bytes a checkpoint of ``config`` holds besides its meta: float64 parameters
    and two AdamW moments of the same shapes, plus 1 MB of slack for small entries."""
    return 3 * 8 * param_count(config)[1] + 2**20


def _read_arrays(path: Path) -> tuple[dict, dict]:
    """-> (arrays, meta) with every declared size checked before any array data is read."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"not a minisparse checkpoint (not an .npz zip archive): {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            headers = {}
            for info in zf.infolist():
                name = info.filename.removesuffix(".npy")
                if name == info.filename or name in headers:
                    raise CheckpointError(f"unexpected zip entry {info.filename!r}")
                with zf.open(info) as f:
                    shape, dtype, fortran = _npy_header(f, info.filename)
                nbytes = math.prod(shape) * dtype.itemsize
                if nbytes > info.compress_size * DEFLATE_MAX_RATIO + 4096:
                    raise CheckpointError(f"entry {info.filename!r} declares {nbytes:,} bytes, "
                                          f"impossible from {info.compress_size:,} stored bytes")
                headers[name] = (info, shape, dtype, fortran, nbytes)
            for key in ("meta", "checksum"):
                if key not in headers:
                    raise CheckpointError(f"has no {key!r} entry")
                if headers[key][4] > MAX_META_BYTES or headers[key][2].kind != "U":
                    raise CheckpointError(f"the {key!r} entry is not a string of at most "
                                          f"{MAX_META_BYTES:,} bytes")
            meta = _parse_meta(_read_member(zf, *headers["meta"][:4]))
            declared = sum(h[4] for k, h in headers.items() if k not in ("meta", "checksum"))
            arrays_implied = param_count(meta["config"])[0]
            stored = sum(k.startswith("param/") for k in headers)
            if stored != arrays_implied:
                raise CheckpointError(f"holds {stored} parameter arrays, its config implies "
                                      f"{arrays_implied:,}")
            bound = _implied_bytes(meta["config"])
            if declared > bound:
                raise CheckpointError(f"its arrays declare {declared:,} bytes, more than its "
                                      f"config implies (at most {bound:,})")
            arrays = {k: _read_member(zf, *h[:4]) for k, h in headers.items() if k != "meta"}
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, ValueError,
            OSError, EOFError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: "
                              f"{type(e).__name__}: {e}") from None
    arrays["meta"] = np.array(meta["json"])
    return arrays, meta


def _parse_meta(meta_array: np.ndarray) -> dict:
    """The meta JSON, with the fields every reader needs checked (config, vocab, step)."""
    text = str(meta_array)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"unreadable meta JSON: {e}") from None
    except RecursionError:
        raise CheckpointError("unreadable meta JSON: nested too deeply") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"meta must be a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"format version {version!r}, expected {FORMAT_VERSION}")
    for key in ("config", "vocab", "step"):
        if key not in meta:
            raise CheckpointError(f"meta lacks {key!r}")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"invalid config: expected a JSON object, got {meta['config']!r}")
    try:
        config = GPTConfig.from_dict(meta["config"])
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"invalid config: {e}") from None
    vocab = meta["vocab"]
    if not isinstance(vocab, str):
        raise CheckpointError(f"meta vocab must be a string, got {type(vocab).__name__}")
    if config.vocab_size != len(vocab):
        raise CheckpointError(f"config vocab_size {config.vocab_size} does not match the stored "
                              f"vocabulary of {len(vocab)} characters")
    step = meta["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"meta step must be an integer >= 0, got {step!r}")
    return {**meta, "config": config, "json": text}


def _meta_dict(meta: dict, key: str) -> dict:
    value = meta.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"meta {key} must be a JSON object, got {value!r}"[:200])
    return value


def _history(meta: dict) -> dict:
    """The loss history, checked: train_loss a list of numbers, val_loss of [step, loss]."""
    history = _meta_dict(meta, "history")
    train_loss, val_loss = history.get("train_loss", []), history.get("val_loss", [])
    number = (int, float)
    ok = (isinstance(train_loss, list) and isinstance(val_loss, list)
          and all(isinstance(v, number) and not isinstance(v, bool) for v in train_loss)
          and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int)
                  and isinstance(p[1], number) for p in val_loss))
    if not ok:
        raise CheckpointError("meta history must hold train_loss [numbers] and val_loss "
                              "[[step, loss], ...]")
    return {**history, "train_loss": train_loss, "val_loss": val_loss}


def _rng_state(meta: dict):
    """The saved bit-generator state, checked by loading it into a generator of its kind."""
    state = meta.get("rng_state")
    if state is None:
        return None
    try:
        bit_generator = getattr(np.random, state["bit_generator"])
        if not (isinstance(bit_generator, type)
                and issubclass(bit_generator, np.random.BitGenerator)):
            raise ValueError(state["bit_generator"])
        bit_generator().state = state
    except Exception as e:  # noqa: BLE001 -- any malformed state (TypeError, KeyError, ...)
        raise CheckpointError(f"meta rng_state is not a valid generator state "
                              f"({type(e).__name__}: {e})"[:300]) from None
    return state


def _optimizer(meta: dict, optim_arrays: dict):
    optimizer = meta.get("optimizer")
    if optimizer is None:
        return None
    if not isinstance(optimizer, dict):
        raise CheckpointError(f"meta optimizer must be a JSON object, got {optimizer!r}"[:200])
    optimizer = _join_arrays(optimizer, optim_arrays)
    for key, value in optimizer.items():
        if isinstance(value, np.ndarray):
            if value.dtype.kind != "f" or not np.isfinite(value).all():
                raise CheckpointError(f"optimizer state {key!r} is not finite floats")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"optimizer state {key!r} must be an array or a step count, "
                                  f"got {value!r}"[:200])
    return optimizer


def load_checkpoint(path) -> Checkpoint:
    """Read and validate a checkpoint; any problem is a CheckpointError naming it."""
    path = Path(path)
    arrays, meta = _read_arrays(path)
    stored = str(arrays.pop("checksum"))
    if _checksum(arrays) != stored:
        raise CheckpointError(f"checkpoint {path} fails its checksum: the file was altered")
    del arrays["meta"]
    config = meta["config"]

    params = {k.removeprefix("param/"): a for k, a in arrays.items() if k.startswith("param/")}
    try:
        check_params(config, params)  # SPEC names and shapes, one float dtype, finite
        params = {name: params[name] for name in param_shapes(config)}  # SPEC order
        optim_arrays = {k: a for k, a in arrays.items() if k.startswith("optim/")}
        other = sorted(set(arrays) - {f"param/{n}" for n in params} - set(optim_arrays))
        if other:
            raise CheckpointError(f"has unexpected entries {other}")
        return Checkpoint(
            config=config,
            params=params,
            vocab=meta["vocab"],
            step=meta["step"],
            optimizer=_optimizer(meta, optim_arrays),
            rng_state=_rng_state(meta),
            settings=_meta_dict(meta, "settings"),
            data=_data(meta),
            history=_history(meta),
        )
    except ValueError as e:  # CheckpointError included
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"checkpoint {path}: meta optimizer nested too deeply") from None


def _data(meta: dict) -> dict:
    data = _meta_dict(meta, "data")
    for key in ("source", "sha256"):
        if key in data and not isinstance(data[key], str):
            raise CheckpointError(f"meta data {key} must be a string, got {data[key]!r}"[:200])
    return data
