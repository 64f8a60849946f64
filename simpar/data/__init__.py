"""Text data for the reference and parallel training runs.

A small English corpus ships inside the package (``simpar/data/corpus.txt``,
about 200 KB of original short stories, essays and dialogues about computing,
parallel training and nature), so every example runs without a download::

    text = load_corpus()
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    train, val = train_val_split(ids, frac=0.9)
    x, y = get_batch(train, batch_size=8, seq_len=64, rng=np.random.default_rng(0))

``y`` is ``x`` shifted by one position: the model reads ``x[:, :t+1]`` and is
asked to predict ``y[:, t]``.
"""
from __future__ import annotations

import os
import re

import numpy as np

__all__ = ["load_corpus", "available_corpora", "CharTokenizer", "train_val_split", "get_batch"]

_DATA_DIR = os.path.dirname(os.path.abspath(__file__))
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def available_corpora() -> list[str]:
    """Names accepted by :func:`load_corpus` (the ``.txt`` files shipped here)."""
    return sorted(f[:-4] for f in os.listdir(_DATA_DIR) if f.endswith(".txt"))


def load_corpus(name: str = "corpus") -> str:
    """The text of the shipped corpus ``name`` (``simpar/data/<name>.txt``)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"corpus name must be a plain file stem, got {name!r}")
    path = os.path.join(_DATA_DIR, name + ".txt")
    if not os.path.isfile(path):
        raise ValueError(f"unknown corpus {name!r}; available: {available_corpora()}")
    with open(path, "r", encoding="ascii") as f:
        return f.read()


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters.

    >>> tok = CharTokenizer("hello")
    >>> tok.chars
    ['e', 'h', 'l', 'o']
    >>> tok.decode(tok.encode("hole"))
    'hole'
    """

    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or len(text) == 0:
            raise ValueError("CharTokenizer needs a non-empty string to build its vocabulary")
        self.chars: list[str] = sorted(set(text))
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.chars)}
        self.itos: dict[int, str] = dict(enumerate(self.chars))
        # Fast path for 8-bit text: a 256-entry lookup table (-1 = not in vocab).
        self._table = np.full(256, -1, dtype=np.int64)
        for c, i in self.stoi.items():
            if ord(c) < 256:
                self._table[ord(c)] = i

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> np.ndarray:
        """Token ids of ``s`` as a 1-D int64 array."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        try:
            raw = np.frombuffer(s.encode("latin-1"), dtype=np.uint8)
        except UnicodeEncodeError:
            raw = None
        if raw is not None:
            ids = self._table[raw]
            bad = np.flatnonzero(ids < 0)
            if bad.size == 0:
                return ids
            pos = int(bad[0])
        else:                                   # characters beyond Latin-1: dict lookup
            unknown = [i for i, c in enumerate(s) if c not in self.stoi]
            if not unknown:
                return np.fromiter((self.stoi[c] for c in s), dtype=np.int64, count=len(s))
            pos = unknown[0]
        raise ValueError(f"unknown character {s[pos]!r} at position {pos}: "
                         f"not in the tokenizer's vocabulary of {self.vocab_size} characters")

    def decode(self, ids) -> str:
        """The string of token ids ``ids`` (any integer sequence or array)."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return ""
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        flat = arr.reshape(-1)
        bad = (flat < 0) | (flat >= self.vocab_size)
        if bad.any():
            v = int(flat[np.flatnonzero(bad)[0]])
            raise ValueError(f"token id {v} out of range for vocab_size {self.vocab_size}")
        return "".join(self.chars[i] for i in flat.tolist())

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def train_val_split(ids: np.ndarray, frac: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream into its first ``frac`` (train) and the rest (validation).

    The split is contiguous (no shuffling), so no validation text leaks into
    training windows.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    if not (0.0 < frac < 1.0):
        raise ValueError(f"frac must be in (0, 1), got {frac!r}")
    n = int(len(ids) * frac)
    if n < 1 or n >= len(ids):
        raise ValueError(f"frac={frac!r} of {len(ids)} tokens leaves an empty split")
    return ids[:n], ids[n:]


def get_batch(ids: np.ndarray, batch_size: int, seq_len: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random batch of windows ``x`` and their next-token targets ``y``.

    Both are int64 arrays of shape ``(batch_size, seq_len)`` with
    ``y[:, t] == x[:, t + 1]`` for ``t < seq_len - 1``; every window lies inside
    ``ids`` (a window needs ``seq_len + 1`` tokens).  ``rng`` is a
    ``np.random.Generator`` (or an int seed), so a run is reproducible.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if seq_len >= len(ids):
        raise ValueError(f"seq_len={seq_len} must be smaller than the data length {len(ids)} "
                         f"(a window needs seq_len + 1 tokens)")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    starts = rng.integers(0, len(ids) - seq_len, size=batch_size)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    windows = ids[idx].astype(np.int64, copy=False)
    return windows[:, :-1].copy(), windows[:, 1:].copy()
