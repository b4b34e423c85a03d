"""Conversion between minisparse checkpoints and files other frameworks read, without pickle.

- ``.safetensors``: the parameters under their SPEC 6 names; the metadata (string -> string)
  holds ``format`` ("minisparse"), ``format_version`` ("1"), and JSON strings of ``config``,
  ``vocab``, ``step``, ``settings`` and ``data``. Needs only the ``safetensors`` package.
- ``.pt``: ``torch.save`` of a plain dict ``{"format", "format_version", "config", "vocab",
  "step", "settings", "data", "state_dict"}``: strings, numbers, lists, dicts and tensors
  only, so ``torch.load(path, weights_only=True)`` reads it; ``["state_dict"]`` loads into
  ``minisparse.torch.GPT``.
- ``.gguf``: written by ``minisparse.gguf.write_gguf`` (export only).

Both directions carry the model, not the training state: an imported checkpoint has no
optimizer or RNG state (``minisparse eval`` and ``sample`` read it; ``train --init-from``
continues from it with a fresh optimizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .gguf import write_gguf
from .model import GPTConfig, check_params

FORMAT = "minisparse"
FORMAT_VERSION = 1
EXPORTS = (".safetensors", ".pt", ".gguf")
IMPORTS = (".safetensors", ".pt")
_META = ("config", "vocab", "step", "settings", "data")


def export_checkpoint(ckpt_path, out_path) -> Path:
    """Write the checkpoint ``ckpt_path`` as ``out_path`` (.safetensors, .pt or .gguf)."""
    out_path = Path(out_path)
    suffix = _suffix(out_path, EXPORTS, "--to")
    ckpt = load_checkpoint(ckpt_path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": ckpt.config.to_dict(),
            "vocab": ckpt.vocab, "step": ckpt.step, "settings": ckpt.settings, "data": ckpt.data}
    if suffix == ".safetensors":
        save_file = _require("safetensors.numpy", "torch").save_file
        arrays = {n: np.ascontiguousarray(a) for n, a in ckpt.params.items()}
        save_file(arrays, str(out_path), metadata={
            "format": FORMAT, "format_version": str(FORMAT_VERSION),
            **{k: json.dumps(meta[k]) for k in _META}})
    elif suffix == ".pt":
        torch = _require("torch", "torch")
        state = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in ckpt.params.items()}
        torch.save({**meta, "state_dict": state}, out_path)
    else:  # llama.cpp's format has its own writer, minisparse.gguf
        _require("gguf", "gguf")
        write_gguf(ckpt.params, ckpt.config, ckpt.vocab, out_path)
    return out_path


def import_checkpoint(path, out_path, overwrite: bool = False) -> Checkpoint:
    """Read a .safetensors or .pt file written by ``export_checkpoint`` (or by hand, with the
    same layout) and write it as the minisparse checkpoint ``out_path`` (an existing one only
    if ``overwrite``); a parameter that is missing, extra or misshapen for the stored config
    is a ValueError naming it."""
    path = Path(path)
    if Path(out_path).exists() and not overwrite:
        raise ValueError(f"{out_path} exists; choose another output or overwrite it")
    suffix = _suffix(path, IMPORTS, "FILE")
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    params, meta = _read_safetensors(path) if suffix == ".safetensors" else _read_torch(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has no minisparse metadata (format {meta.get('format')!r}); "
                         "write it with `minisparse export`, or add config and vocab")
    if str(meta.get("format_version")) != str(FORMAT_VERSION):
        raise ValueError(f"{path} has export format version {meta.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}")
    missing = [k for k in _META if k not in meta]
    if missing:
        raise ValueError(f"{path}: the metadata lacks {missing}")
    config = GPTConfig.from_dict(meta["config"])
    try:
        check_params(config, params)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    ckpt = Checkpoint(config=config, params=params, vocab=meta["vocab"], step=int(meta["step"]),
                      settings=meta["settings"], data=meta["data"])
    save_checkpoint(out_path, ckpt)
    return ckpt


def _read_safetensors(path):
    safe_open = _require("safetensors", "torch").safe_open
    try:
        with safe_open(str(path), framework="numpy") as f:
            params = {name: f.get_tensor(name) for name in f.keys()}
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        return params, {k: json.loads(v) if k in _META else v for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: unreadable JSON in its metadata: {e}") from None


def _read_torch(path):
    torch = _require("torch", "torch")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refused by weights_only, truncated file, ...
        raise ValueError(f"{path} is not a torch file of tensors and plain values: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise ValueError(f"{path} holds no minisparse export (a dict with config, vocab and "
                         "state_dict); write it with `minisparse export`")
    params = {}
    for name, t in obj["state_dict"].items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{path}: state_dict[{name!r}] is not a float tensor")
        params[name] = t.detach().cpu().numpy()
    return params, {k: v for k, v in obj.items() if k != "state_dict"}


def _suffix(path: Path, allowed, what) -> str:
    if path.suffix not in allowed:
        raise ValueError(f"{what} must end in one of {', '.join(allowed)}, got {str(path)!r}")
    return path.suffix


def _require(module, extra):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"this needs the {module} package: pip install 'minisparse[{extra}]'") \
            from None
