import numpy as np
import pytest

from minisparse.data import (
    SYNTHETIC_WORDS,
    CharTokenizer,
    DataError,
    bundled_text,
    get_batch,
    load_text,
    make_dataset,
    synthetic_text,
)


def test_tokenizer_vocab_is_sorted_set_and_round_trips():
    tok = CharTokenizer.from_text("hello, world")
    assert tok.vocab == " ,dehlorw"
    ids = tok.encode("hello")
    assert ids.dtype == np.int64 and ids.tolist() == [4, 3, 5, 5, 6]
    assert tok.decode(ids) == "hello"
    assert tok.decode([]) == "" and tok.encode("").shape == (0,)


def test_tokenizer_rejects_unknown_characters_and_ids():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DataError, match=r"'z' at position 2"):
        tok.encode("abzc")
    with pytest.raises(DataError, match=r"token id 3 outside \[0, 3\)"):
        tok.decode([0, 3])
    with pytest.raises(DataError, match="repeated"):
        CharTokenizer("aba")


def test_bundled_corpus_matches_spec_recipe():
    text = bundled_text()
    data = make_dataset(text, context=64)
    assert len(text) == 1_115_394 and data.tokenizer.vocab_size == 65
    # SPEC section 9: first 90% train, last 10% validation, nothing dropped.
    assert len(data.train) == int(0.9 * len(text))
    assert np.concatenate([data.train, data.val]).tolist()[:20] == data.tokenizer.encode(
        text[:20]
    ).tolist()
    assert data.tokenizer.decode(data.val[-30:]) == text[-30:]


def test_load_text_reads_utf8(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("naïve café ✓\n" * 3, encoding="utf-8")
    assert load_text(p) == "naïve café ✓\n" * 3


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "not found"),
        (b"", "empty"),
        (b"abc\x00def", "binary"),
        (b"abc\xff\xfedef", "not valid UTF-8"),
    ],
)
def test_load_text_errors_are_clear(tmp_path, content, match):
    p = tmp_path / "data.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        load_text(p)
    assert str(p) in str(e.value)


def test_load_text_rejects_directory(tmp_path):
    with pytest.raises(DataError, match="not a file"):
        load_text(tmp_path)


def test_too_short_text_names_the_split_sizes():
    # 50 chars -> 45 train / 5 val tokens: val cannot hold a context-8 window.
    with pytest.raises(DataError, match=r"too short for context 8.*45 train / 5 val"):
        make_dataset("ab" * 25, context=8)
    make_dataset("ab" * 50, context=8)  # 90 / 10 tokens: both fit 9


def test_make_dataset_with_given_tokenizer():
    tok = CharTokenizer("abcd")
    data = make_dataset("abcd" * 30, context=4, tokenizer=tok)
    assert data.tokenizer is tok
    with pytest.raises(DataError, match="'x'"):
        make_dataset("abcx" * 30, context=4, tokenizer=tok)


def test_get_batch_windows_and_targets():
    data = np.arange(100, dtype=np.int64)
    x, y = get_batch(np.random.default_rng(0), data, batch=16, context=10)
    assert x.shape == y.shape == (16, 10)
    # windows are contiguous runs and y is x shifted by one
    assert (np.diff(x, axis=1) == 1).all() and (y == x + 1).all()
    assert x.min() >= 0 and y.max() <= 99


def test_get_batch_depends_only_on_rng_state():
    data = np.arange(1000, dtype=np.int64)
    a = get_batch(np.random.default_rng(7), data, 4, 8)
    b = get_batch(np.random.default_rng(7), data, 4, 8)
    assert all((p == q).all() for p, q in zip(a, b, strict=True))
    # every window start 0 .. len - context - 1 is drawn, so every token can be a target
    rng = np.random.default_rng(0)
    starts = {int(get_batch(rng, np.arange(12), 1, 9)[0][0, 0]) for _ in range(40)}
    assert starts == {0, 1, 2}
    with pytest.raises(DataError, match="need at least"):
        get_batch(np.random.default_rng(0), np.arange(5), 1, 5)


def test_synthetic_text_is_deterministic_and_sized():
    a = synthetic_text(np.random.default_rng(1), 500)
    assert a == synthetic_text(np.random.default_rng(1), 500)
    words = "".join(SYNTHETIC_WORDS)
    assert len(a) == 500 and set(a) <= set(words + words.upper() + " .\n")
