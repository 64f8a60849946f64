"""The shipped corpus, the character tokenizer, splits and batches."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from simpar.data import CharTokenizer, get_batch, load_corpus, train_val_split


@pytest.fixture(scope="module")
def text():
    return load_corpus()


def test_corpus_is_shipped_ascii_text_of_reasonable_size(text):
    assert 100_000 <= len(text) <= 300_000
    text.encode("ascii")                      # raises if not ASCII
    words = text.split()
    assert len(words) > 15_000
    assert text.count(". ") > 1000            # sentences, not a word soup
    assert "parallel" in text and "river" in text


def test_load_corpus_rejects_unknown_names():
    with pytest.raises(ValueError, match="nope"):
        load_corpus("nope")
    with pytest.raises(ValueError, match=r"\.\./"):
        load_corpus("../setup")


def test_tokenizer_vocab_is_sorted_characters(text):
    tok = CharTokenizer(text)
    assert tok.chars == sorted(set(text))
    assert tok.vocab_size == len(set(text))
    assert tok.vocab_size < 100
    assert [tok.stoi[c] for c in tok.chars] == list(range(tok.vocab_size))


def test_tokenizer_round_trip(text):
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.decode(ids[:50].tolist()) == text[:50]     # lists work too
    assert tok.decode([]) == ""
    assert tok.encode("").shape == (0,)


def test_tokenizer_small_example():
    tok = CharTokenizer("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    np.testing.assert_array_equal(tok.encode("hole"), [3, 5, 4, 2])
    assert tok.decode(np.array([[3, 5], [4, 2]])) == "hole"


@pytest.mark.parametrize("bad", ["~", "\u00e9", "\u20ac"])   # ASCII, Latin-1, beyond Latin-1
def test_tokenizer_names_unknown_character(text, bad):
    tok = CharTokenizer(text)
    with pytest.raises(ValueError, match=repr(bad)) as e:
        tok.encode("abc" + bad + "d")
    assert "position 3" in str(e.value)


def test_tokenizer_beyond_latin1():
    tok = CharTokenizer("ab\u20ac\u00e9")
    assert tok.chars == ["a", "b", "\u00e9", "\u20ac"]
    np.testing.assert_array_equal(tok.encode("\u20acab\u00e9"), [3, 0, 1, 2])
    np.testing.assert_array_equal(tok.encode("ba"), [1, 0])
    assert tok.decode(tok.encode("\u20ac\u00e9b")) == "\u20ac\u00e9b"
    with pytest.raises(ValueError, match="'z' at position 1"):
        tok.encode("\u20acz")


def test_tokenizer_errors():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match="3"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(ValueError, match="integers"):
        tok.decode(np.array([0.5]))
    with pytest.raises(ValueError):
        CharTokenizer("")
    with pytest.raises(TypeError):
        tok.encode(b"abc")


@given(st.text(alphabet="abcdef \n.", max_size=60))
def test_tokenizer_round_trip_property(s):
    tok = CharTokenizer("abcdef \n.")
    assert tok.decode(tok.encode(s)) == s


def test_train_val_split():
    ids = np.arange(1000)
    tr, va = train_val_split(ids, 0.9)
    assert len(tr) == 900 and len(va) == 100
    np.testing.assert_array_equal(np.concatenate([tr, va]), ids)
    for frac in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=repr(frac)):
            train_val_split(ids, frac)
    with pytest.raises(ValueError, match="empty"):
        train_val_split(np.arange(3), 0.1)


def test_batches_are_shifted_windows_of_the_data():
    ids = np.arange(100)                      # a window of arange is itself a range
    x, y = get_batch(ids, batch_size=16, seq_len=10, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (16, 10)
    assert x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(y, x + 1)   # y is x shifted by one
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)
    assert x.min() >= 0 and y.max() <= 99


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 60), b=st.integers(1, 5), s=st.integers(1, 59), seed=st.integers(0, 99))
def test_batches_stay_in_range_property(n, b, s, seed):
    ids = np.arange(n) * 3
    if s >= n:
        with pytest.raises(ValueError, match=f"seq_len={s}"):
            get_batch(ids, b, s, np.random.default_rng(seed))
        return
    x, y = get_batch(ids, b, s, np.random.default_rng(seed))
    np.testing.assert_array_equal(y, x + 3)
    assert x.min() >= 0 and y.max() <= 3 * (n - 1)


def test_batches_cover_the_last_window():
    # with seq_len = len - 1 there is exactly one window: the whole array
    ids = np.arange(7)
    x, y = get_batch(ids, 3, 6, np.random.default_rng(1))
    np.testing.assert_array_equal(x, np.tile(np.arange(6), (3, 1)))
    np.testing.assert_array_equal(y, np.tile(np.arange(1, 7), (3, 1)))


def test_batches_are_reproducible(text):
    ids = CharTokenizer(text).encode(text)
    a = get_batch(ids, 4, 32, np.random.default_rng(7))
    b = get_batch(ids, 4, 32, np.random.default_rng(7))
    c = get_batch(ids, 4, 32, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_get_batch_validates_arguments():
    ids = np.arange(50)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="seq_len=50"):
        get_batch(ids, 2, 50, rng)
    with pytest.raises(ValueError, match="batch_size.*0"):
        get_batch(ids, 0, 5, rng)
    with pytest.raises(ValueError, match="seq_len.*-1"):
        get_batch(ids, 2, -1, rng)
    with pytest.raises(ValueError, match="2.5"):
        get_batch(ids, 2.5, 5, rng)
    with pytest.raises(ValueError, match="1-D"):
        get_batch(ids.reshape(5, 10), 2, 5, rng)
