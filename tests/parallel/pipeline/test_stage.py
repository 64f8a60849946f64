"""Cutting a GPT into stages: by layers, by parameters, explicit; stage modules."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simpar.nn import GPT, GPTConfig
from simpar.parallel.pipeline import PipelineStage, build_stages, partition
from simpar.parallel.pipeline.stage import stage_param_counts
from tests.parallel.pipeline.checks import make_model, tiny_config
from tests.util import assert_close


def test_partition_by_layers_is_even_front_loaded():
    model = make_model(tiny_config(7))
    assert [len(r) for r in partition(model, 3)] == [3, 2, 2]
    assert [list(r) for r in partition(model, 7)] == [[i] for i in range(7)]
    assert partition(model, 2, [6, 1]) == [range(0, 6), range(6, 7)]


def _compositions(L, n):
    for cut in itertools.combinations(range(1, L), n - 1):
        edges = (0, *cut, L)
        yield [edges[i + 1] - edges[i] for i in range(n)]


@settings(max_examples=15, deadline=None)
@given(L=st.integers(1, 7), n=st.integers(1, 4), vocab=st.integers(2, 80),
       widths=st.lists(st.integers(1, 40), min_size=7, max_size=7))
def test_partition_by_params_is_optimal(L, n, vocab, widths):
    """Brute force over every contiguous split: none has a smaller largest stage."""
    if n > L:
        return
    cfg = GPTConfig(vocab_size=vocab, seq_len=3, n_layer=L, n_head=1, d_model=4, d_ff=4)
    model = GPT(cfg)
    for i, blk in enumerate(model.blocks):      # blocks of different parameter counts
        blk.mlp.fc1.params["W"] = np.zeros((4, widths[i]))      # (only counted, never run)
    best = min(max(stage_param_counts(model, partition(model, n, sizes)))
               for sizes in _compositions(L, n))
    got = partition(model, n, "params")
    assert max(stage_param_counts(model, got)) == best
    assert [i for r in got for i in r] == list(range(L))


def test_partition_by_params_moves_layers_off_heavy_ends():
    cfg = GPTConfig(vocab_size=512, seq_len=4, n_layer=6, n_head=2, d_model=16)
    bounds = partition(GPT(cfg), 3, "params")
    sizes = [len(r) for r in bounds]
    assert sizes[0] < 2 and sizes[-1] < 2 and sum(sizes) == 6    # big vocab at both ends


@pytest.mark.parametrize("args,match", [
    ((4,), "n_layer=3 into 4 pipeline stages"),
    ((0,), "positive"),
    ((2, "flops"), "'flops'"),
    ((2, [2, 2]), r"\[2, 2\]"),
    ((2, [3, 0]), r"\[3, 0\]"),
    ((2, [1, 1, 1]), "2 positive"),
])
def test_partition_errors(args, match):
    with pytest.raises(ValueError, match=match):
        partition(make_model(tiny_config(3)), *args)


def test_stages_share_the_reference_names_and_arrays():
    model = make_model(tiny_config(5))
    stages = build_stages(model, 3, "layers")
    names = [set(s.parameters()) for s in stages]
    assert {"wte", "wpe"} <= names[0] and "lm_head.W" in names[2] and "ln_f.gamma" in names[2]
    assert not names[1] & {"wte", "wpe", "lm_head.W"}
    assert set().union(*names) == set(model.parameters())
    assert sum(len(n) for n in names) == len(model.parameters())
    assert stages[0].parameters()["wte"] is model.params["wte"]          # live, shared
    assert repr(stages[0]) == "PipelineStage(0/3: embedding + blocks[0:2])"
    # tied embeddings: first and last stage each hold wte (summed over the embedding group)
    tied = GPT(GPTConfig(vocab_size=11, seq_len=5, n_layer=2, n_head=2, d_model=8,
                         tie_weights=True))
    first, last = PipelineStage(tied, 0, 2, range(1)), PipelineStage(tied, 1, 2, range(1, 2))
    assert "wte" in first.params and "wte" in last.params and "wpe" not in last.params
    assert last.piece_names()["head"] == ["ln_f.gamma", "ln_f.beta", "wte"]
    with pytest.raises(ValueError, match="stage index 3"):
        PipelineStage(model, 3, 3, range(1))


@pytest.mark.parametrize("n", [1, 2, 4])
def test_chained_stages_equal_the_model(n):
    """Stages run one after another in one process give the model's logits and
    gradients; so does the zero-bubble split (backward_input, then backward_weights)."""
    cfg = tiny_config(4)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, (2, 5))
    dlogits = rng.standard_normal((2, 5, cfg.vocab_size))
    ref = make_model(cfg)
    logits = ref.forward(idx, 0)
    ref.backward(dlogits, 0)
    for split in (False, True):
        model = make_model(cfg)
        stages = build_stages(model, n)
        x = idx
        for s in stages:
            x = s.forward(x, key=7)
        assert_close(x, logits, "logits")
        dy = dlogits
        for s in reversed(stages):
            dy = s.backward_input(dy, key=7) if split else s.backward(dy, key=7)
        assert dy is None
        if split:
            for s in stages:
                s.backward_weights(key=7)
        assert all(s.saved_keys() == [] for s in stages)
        for k, g in model.gradients().items():
            assert_close(g, ref.gradients()[k], k)
