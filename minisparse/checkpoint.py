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
"""

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .model import GPTConfig, check_params, param_shapes

FORMAT_VERSION = 1


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
            if key not in arrays:
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
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically: temp file in the same directory, fsync, rename.

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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_arrays(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint is not a file: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"not a minisparse checkpoint (not an .npz zip archive): {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {key: z[key] for key in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {e}") from None


def load_checkpoint(path) -> Checkpoint:
    """Read and validate a checkpoint; any problem is a CheckpointError naming it."""
    path = Path(path)
    arrays = _read_arrays(path)
    for key in ("meta", "checksum"):
        if key not in arrays:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry")
    stored = str(arrays.pop("checksum"))
    if _checksum(arrays) != stored:
        raise CheckpointError(f"checkpoint {path} fails its checksum: the file was altered")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has unreadable meta JSON: {e}") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}, expected {FORMAT_VERSION}"
        )
    for key in ("config", "vocab", "step"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {path} meta lacks {key!r}")
    try:
        config = GPTConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {e}") from None
    if config.vocab_size != len(meta["vocab"]):
        raise CheckpointError(
            f"checkpoint {path}: config vocab_size {config.vocab_size} does not match "
            f"the stored vocabulary of {len(meta['vocab'])} characters"
        )

    params = {k.removeprefix("param/"): a for k, a in arrays.items() if k.startswith("param/")}
    try:
        check_params(config, params)  # SPEC names and shapes, one float dtype, finite
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    params = {name: params[name] for name in param_shapes(config)}  # SPEC order

    optim_arrays = {k: a for k, a in arrays.items() if k.startswith("optim/")}
    optimizer = meta.get("optimizer")
    if optimizer is not None:
        optimizer = _join_arrays(optimizer, optim_arrays)
    other = sorted(set(arrays) - {f"param/{n}" for n in params} - set(optim_arrays))
    if other:
        raise CheckpointError(f"checkpoint {path} has unexpected entries {other}")
    return Checkpoint(
        config=config,
        params=params,
        vocab=meta["vocab"],
        step=int(meta["step"]),
        optimizer=optimizer,
        rng_state=meta.get("rng_state"),
        settings=meta.get("settings", {}),
        data=meta.get("data", {}),
        history=meta.get("history", {}),
    )
