"""The single-process reference training loop."""
import math

import numpy as np
import pytest

from simpar.nn import GPTConfig
from simpar.train import DEFAULT_MODEL, default_config, evaluate, sample, train_reference

TINY = dict(seq_len=32, n_layer=1, n_head=2, d_model=32)


@pytest.fixture(scope="module")
def short_run():
    return train_reference(steps=150, batch_size=16, lr=5e-3, seed=0, eval_batches=4)


def test_loss_falls_clearly_below_ln_vocab(short_run):
    out = short_run
    ln_v = out["ln_vocab"]
    assert ln_v == pytest.approx(math.log(out["tokenizer"].vocab_size))
    assert len(out["loss"]) == 150 and all(math.isfinite(x) for x in out["loss"])
    # an untrained model guesses uniformly: loss ~ ln(vocab)
    assert abs(out["initial_loss"] - ln_v) < 0.15
    # and after 150 steps it has learned at least the letter statistics
    assert out["final_loss"] < ln_v - 1.4
    assert out["val_loss"] < ln_v - 1.4
    assert max(out["loss"][-20:]) < ln_v - 1.2          # every late step, not just the mean


def test_run_returns_its_pieces(short_run):
    out = short_run
    assert out["config"].vocab_size == out["tokenizer"].vocab_size
    assert out["tokens"] == 150 * 16 * out["config"].seq_len
    assert out["optimizer"].t == 150
    assert len(out["lr"]) == 150 and max(out["lr"]) == pytest.approx(5e-3)
    assert all(p.dtype == np.float32 for p in out["model"].parameters().values())
    assert out["model"].saved_bytes() == 0          # nothing left over from eval
    text = sample(out["model"], out["tokenizer"], "The ", n=40, seed=1)
    assert len(text) == 40
    assert sample(out["model"], out["tokenizer"], "The ", n=40, seed=1) == text


def test_same_seed_gives_bit_identical_history():
    a = train_reference(config=TINY, steps=12, batch_size=4, seed=3, eval_batches=1)
    b = train_reference(config=TINY, steps=12, batch_size=4, seed=3, eval_batches=1)
    c = train_reference(config=TINY, steps=12, batch_size=4, seed=4, eval_batches=1)
    assert a["loss"] == b["loss"] and a["val_loss"] == b["val_loss"]
    assert a["loss"] != c["loss"]
    for k, p in a["model"].parameters().items():
        np.testing.assert_array_equal(p, b["model"].parameters()[k])


def test_float64_run_agrees_with_float32_at_first():
    a = train_reference(config=TINY, steps=3, batch_size=4, seed=0, eval_batches=0)
    b = train_reference(config=TINY, steps=3, batch_size=4, seed=0, eval_batches=0,
                        dtype=np.float64)
    assert all(p.dtype == np.float64 for p in b["model"].parameters().values())
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)


def test_config_forms_and_errors():
    cfg = default_config(66)
    assert isinstance(cfg, GPTConfig) and cfg.n_layer == DEFAULT_MODEL["n_layer"]
    with pytest.raises(ValueError, match="vocab_size=10"):
        train_reference(config=GPTConfig(10, 16, 1, 1, 8), steps=1)
    with pytest.raises(ValueError, match="vocab_size=10"):
        train_reference(config=dict(TINY, vocab_size=10), steps=1)
    with pytest.raises(ValueError, match="steps=0"):
        train_reference(steps=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        train_reference(steps=1, batch_size=0)
    with pytest.raises(TypeError):
        train_reference(config="big", steps=1)


def test_evaluate_is_forward_only_and_deterministic():
    out = train_reference(config=TINY, steps=2, batch_size=2, eval_batches=0)
    model = out["model"]
    before = {k: g.copy() for k, g in model.gradients().items()}
    from simpar.data import CharTokenizer, load_corpus
    tok = CharTokenizer(load_corpus())
    ids = tok.encode(load_corpus()[:5000])
    v1 = evaluate(model, ids, batch_size=4, n_batches=2)
    v2 = evaluate(model, ids, batch_size=4, n_batches=2)
    assert v1 == v2 and math.isfinite(v1)
    for k, g in model.gradients().items():
        np.testing.assert_array_equal(g, before[k])


def test_logging(capsys):
    lines = []
    train_reference(config=TINY, steps=5, batch_size=2, log_every=2, eval_batches=1, log=lines.append)
    assert [l.split("|")[0].split() for l in lines[:-1]] == [["step", "0"], ["step", "2"], ["step", "4"]]
    assert lines[-1].startswith("val loss")
