"""Character-level data: tokenizer, bundled tiny Shakespeare, train/val split, random batches.

SPEC section 9: vocab = sorted set of the characters of the whole text; the first 90% of the
tokens train, the last 10% validate; a batch is ``batch`` random windows of ``context + 1``
tokens (inputs and next-token targets).
"""

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

BUNDLED = "tinyshakespeare"  # the name the CLI and checkpoints use for the bundled corpus
TRAIN_FRACTION = 0.9


class DataError(ValueError):
    """A data file or text that cannot be used for training (the message says why)."""


class CharTokenizer:
    """Maps each character of ``vocab`` to its index; ``vocab`` is a string of unique chars."""

    def __init__(self, vocab: str):
        if not vocab:
            raise DataError("tokenizer vocabulary is empty")
        if len(set(vocab)) != len(vocab):
            raise DataError("tokenizer vocabulary has repeated characters")
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The SPEC section 9 vocabulary: the sorted set of characters of ``text``."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> np.ndarray:
        """str -> int64 ids [len(text)]; a character outside the vocabulary is a DataError."""
        try:
            return np.fromiter((self.stoi[ch] for ch in text), dtype=np.int64, count=len(text))
        except KeyError as e:
            pos = next(i for i, ch in enumerate(text) if ch not in self.stoi)
            raise DataError(
                f"character {e.args[0]!r} at position {pos} is not in the tokenizer "
                f"vocabulary ({self.vocab_size} characters)"
            ) from None

    def decode(self, ids) -> str:
        """int ids -> str; an id outside [0, vocab_size) is a DataError."""
        ids = np.asarray(ids).reshape(-1)
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise DataError(f"token id {int(ids[bad][0])} outside [0, {self.vocab_size})")
        return "".join(self.vocab[i] for i in ids.tolist())


def bundled_text() -> str:
    """The bundled tiny Shakespeare corpus (1.1M characters, 65 distinct)."""
    return resources.files("minisparse").joinpath("data/tinyshakespeare.txt").read_text("utf-8")


def load_text(path) -> str:
    """Read a UTF-8 text file; a missing, unreadable, empty or binary file is a DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    if not raw:
        raise DataError(f"data file is empty: {path}")
    if b"\x00" in raw:
        raise DataError(f"data file looks binary (contains NUL bytes): {path}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"data file is not valid UTF-8 text (byte {e.start}): {path}"
        ) from None


@dataclass
class Dataset:
    """Token ids split into train (first 90%) and val (last 10%), plus their tokenizer."""

    tokenizer: CharTokenizer
    train: np.ndarray  # int64 [n_train]
    val: np.ndarray  # int64 [n_val]


def make_dataset(text: str, context: int, tokenizer: CharTokenizer | None = None) -> Dataset:
    """Tokenize ``text`` (vocab from the text unless a tokenizer is given) and split 90/10.

    Each split must hold at least ``context + 1`` tokens so one window fits.
    """
    if tokenizer is None:
        if not text:
            raise DataError("text is empty")
        tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    n_train = int(TRAIN_FRACTION * len(ids))
    train, val = ids[:n_train], ids[n_train:]
    need = context + 1
    if len(train) < need or len(val) < need:
        raise DataError(
            f"text too short for context {context}: {len(ids)} characters give "
            f"{len(train)} train / {len(val)} val tokens, each split needs at least {need}"
        )
    return Dataset(tokenizer, train, val)


def get_batch(rng: np.random.Generator, data: np.ndarray, batch: int, context: int):
    """``batch`` random windows of ``data``: inputs x [batch, context] and targets y = x
    shifted left by one. Draws exactly one ``rng.integers`` call (resume relies on this)."""
    if len(data) < context + 1:
        raise DataError(f"data has {len(data)} tokens, need at least context + 1 = {context + 1}")
    start = rng.integers(0, len(data) - context, size=batch)
    windows = np.lib.stride_tricks.sliding_window_view(data, context + 1)[start]  # copy
    return windows[:, :-1], windows[:, 1:]


SYNTHETIC_WORDS = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to", "see", "it")


def synthetic_text(rng: np.random.Generator, n_chars: int = 20_000) -> str:
    """Random short sentences over a tiny word list: learnable in a few steps, for tests."""
    sentences, total = [], 0
    while total < n_chars:
        words = rng.choice(SYNTHETIC_WORDS, size=int(rng.integers(3, 8)))
        sentence = " ".join(words).capitalize() + ".\n"
        sentences.append(sentence)
        total += len(sentence)
    return "".join(sentences)[:n_chars]
