"""Sharded checkpoints (simpar.checkpoint): save under dp2×tp2×pp2 with ZeRO-1,
resume under one process, pp2×tp2 and dp4 ZeRO-3 — losses equal the
uninterrupted run (bit-identical on the same layout); an interrupted save leaves
the previous checkpoint loadable; mismatched, truncated or corrupted
checkpoints fail naming the tensor or file; export/import of one reference
state_dict; the index names every shard's slice and covers each tensor once."""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections import defaultdict

import numpy as np
import pytest

import simpar
from simpar import checkpoint as ck
from simpar.comm.mesh import Mesh
from simpar.parallel.hybrid import build_model
from simpar.parallel.zero import DistributedOptimizer
from simpar.testing import TOL, compare, rel_error, worst
from tests.checkpoint_checks import KW, RESUME, SAVE, P, run, run_hybrid
from tests.mpi_util import run_mpi


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The uninterrupted run (8 steps), checkpointed at steps 4 and 8."""
    root = tmp_path_factory.mktemp("ckpt")
    layout, zero = SAVE
    losses, params = simpar.launch(lambda c: run(c, layout, zero, save=str(root),
                                                 save_every=4), layout.world_size)[0]
    return root, losses, params


@pytest.mark.parametrize("name", list(RESUME))
def test_resume_on_any_layout_equals_the_uninterrupted_run(saved, name):
    root, losses, params = saved
    layout, zero = RESUME[name]
    got, got_params = simpar.launch(
        lambda c: run(c, layout, zero, resume=str(root / "step-00000004")),
        layout.world_size)[0]
    if (layout, zero) == SAVE:
        np.testing.assert_array_equal(got, losses[4:])          # bit for bit
        for k in params:
            np.testing.assert_array_equal(got_params[k], params[k])
    else:
        assert rel_error(got, losses[4:]) <= TOL
        assert worst(compare(got_params, params)) <= TOL


def test_resume_under_mpi(saved, tmp_path):
    """The threads scenario under mpiexec: the uninterrupted run equals the threads
    run; a resume on the same layout is bit for bit (losses and final
    parameters), on another layout within TOL."""
    root = tmp_path / "mpi"
    out = run_mpi(8, "tests/scripts/checkpoint_mpi.py", "save", str(root), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    by_n = defaultdict(list)
    for name, (layout, _) in RESUME.items():
        by_n[layout.world_size].append(name)
    lines = out.stdout
    for n, names in sorted(by_n.items()):
        res = run_mpi(n, "tests/scripts/checkpoint_mpi.py", "resume", str(root), *names,
                      timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        lines += res.stdout
    got = {}
    for ln in lines.splitlines():
        if ln.startswith("losses "):
            name, values = ln[len("losses "):].split(" [", 1)
            with np.load(root / "params" / f"{name}.npz") as f:
                got[name] = (np.array(json.loads("[" + values)), {k: f[k] for k in f.files})
    full_losses, full_params = got.pop("uninterrupted")
    assert rel_error(full_losses, saved[1]) <= TOL            # MPI run = threads run
    assert worst(compare(full_params, saved[2])) <= TOL
    assert set(got) == set(RESUME), got.keys()
    for name, result in got.items():
        _resumed_equal(result, (full_losses[4:], full_params), same=RESUME[name] == SAVE)


def test_index_names_every_slice_and_covers_each_tensor_once(saved):
    root = saved[0]
    index = ck.read_index(root)
    assert index["step"] == 8 and Path_name(ck.resolve(root)) == "step-00000008"
    assert index["layout"]["world_size"] == 8 and index["optimizer"]["zero"] == 1
    assert index["trainer"]["step"] == 8 and "data_rng" in index["trainer"]
    covered = defaultdict(int)
    for e in index["entries"]:
        assert {"tensor", "kind", "box", "flat", "file", "key", "sha256"} <= set(e)
        box = [b - a for a, b in e["box"]]
        assert 0 <= e["flat"][0] < e["flat"][1] <= int(np.prod(box))
        covered[(e["tensor"], e["kind"])] += e["flat"][1] - e["flat"][0]
    for name, meta in index["tensors"].items():
        for kind in ("param", "m", "v"):
            assert covered[(name, kind)] == int(np.prod(meta["shape"])), (name, kind)
    files = sorted(p.name for p in ck.resolve(root).glob("rank*.npz"))
    assert files == [f"rank{r:05d}.npz" for r in range(8)]
    qkv = [e for e in index["entries"] if e["tensor"] == "blocks.0.attn.qkv.W"
           and e["kind"] == "param"]
    assert len(qkv) == 2 * 3            # tp2 x [q | k | v] boxes (dp ranks split the rows)


def Path_name(p):
    return p.name


# ------------------------------------------------------------- atomic writes
def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    layout, zero = P(dp=2), 2
    root = tmp_path / "c"
    orig = ck._write_shard

    def dies_saving_step6_on_rank1(path, arrays):
        if path.parent.name == ".tmp-step-00000006" and path.name == "rank00001.npz":
            raise OSError("disk full (injected)")
        return orig(path, arrays)
    ck._write_shard = dies_saving_step6_on_rank1
    try:
        with pytest.raises(Exception, match="injected"):
            simpar.launch(lambda c: run(c, layout, zero, steps=6, save=str(root),
                                        save_every=2), 2, timeout=60)
    finally:
        ck._write_shard = orig
    assert (root / ".tmp-step-00000006" / "rank00000.npz").exists()   # half written
    assert not (root / ".tmp-step-00000006" / "rank00001.npz").exists()
    assert (root / "latest").read_text().strip() == "step-00000004"
    assert ck.read_index(root)["step"] == 4                         # the previous one
    got, _ = simpar.launch(lambda c: run(c, layout, zero, steps=6, resume=str(root),
                                         save=str(root), save_every=2), 2)[0]
    assert len(got) == 2 and (root / "latest").read_text().strip() == "step-00000006"
    assert not (root / ".tmp-step-00000006").exists()
    ref, _ = simpar.launch(lambda c: run(c, layout, zero, steps=6), 2)[0]
    np.testing.assert_array_equal(got, ref[4:])


# -------------------------------------------------------------- clear errors
def _load_error(comm, root, **model):
    from tests.parallel.hybrid_checks import Layout, make_reference
    from simpar.nn import GPT, GPTConfig
    cfg = GPTConfig(**{**dict(vocab_size=VOCAB, seq_len=16, n_layer=2, n_head=2, d_model=16),
                       **model})
    hybrid = build_model(GPT(cfg, seed=0), Mesh(comm, P(dp=2)))
    opt = DistributedOptimizer(hybrid, 1, lr=1e-2)
    try:
        ck.load(root, hybrid, opt)
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    return "no error"


VOCAB = None


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A checkpoint of the default corpus model (dp2, ZeRO-1, 2 steps)."""
    global VOCAB
    root = tmp_path_factory.mktemp("small")
    out = simpar.launch(lambda c: run(c, P(dp=2), 1, steps=2, save=str(root)), 2)
    VOCAB = ck.read_index(root)["model"]["config"]["vocab_size"]
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_model_config_mismatch_is_named(small, tmp_path):
    msgs = simpar.launch(lambda c: _load_error(c, small, n_layer=3), 2)
    assert all("n_layer: checkpoint 2, model 3" in m for m in msgs), msgs


def test_shape_mismatch_is_named(small, tmp_path):
    bad = _copy(ck.resolve(small), tmp_path / "bad")
    index = json.loads((bad / "index.json").read_text())
    index["tensors"]["blocks.1.mlp.fc1.W"]["shape"] = [16, 32]
    (bad / "index.json").write_text(json.dumps(index))
    msgs = simpar.launch(lambda c: _load_error(c, bad), 2)
    assert all("'blocks.1.mlp.fc1.W'" in m for m in msgs), msgs


def test_truncated_shard_is_named(small, tmp_path):
    bad = _copy(ck.resolve(small), tmp_path / "bad")
    f = bad / "rank00001.npz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    msgs = simpar.launch(lambda c: _load_error(c, bad), 2)
    assert all("rank00001.npz" in m and "truncated or corrupted" in m for m in msgs), msgs


def test_corrupted_values_are_caught_by_the_checksum(small, tmp_path):
    bad = _copy(ck.resolve(small), tmp_path / "bad")
    index = json.loads((bad / "index.json").read_text())
    e = next(e for e in index["entries"] if e["tensor"] == "wte" and e["kind"] == "v")
    with np.load(bad / e["file"]) as z:
        arrays = {k: z[k] for k in z.files}
    arrays[e["key"]] = arrays[e["key"]] * 1.0000001          # a valid file, wrong values
    np.savez(bad / e["file"], **arrays)
    msgs = simpar.launch(lambda c: _load_error(c, bad), 2)
    assert all(f"checksum mismatch for v of 'wte'" in m and e["file"] in m for m in msgs), msgs


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.read_index(tmp_path)


# ------------------------------------------------- one reference state_dict
def test_export_and_import_a_reference_state_dict(saved, tmp_path):
    root, _, params = saved
    path = ck.export_state_dict(root, tmp_path / "model.npz")
    sd = ck.import_state_dict(path)
    assert set(sd) == set(params)
    assert worst(compare(sd, params)) == 0.0
    from simpar.train import build_reference
    cfg = ck.read_index(root)["model"]["config"]
    ref = build_reference(cfg["vocab_size"], 0, np.float64, **{k: cfg[k] for k in
                                                               ("n_layer", "d_model", "n_head",
                                                                "seq_len")})
    ref.load_state_dict(sd)                      # the GPT-2-style names of the reference

    def into_zero3(comm):
        hybrid = build_model(ref, Mesh(comm, P(dp=2, tp=2)))
        opt = DistributedOptimizer(hybrid, 3, lr=1e-2)
        ck.import_state_dict(path, hybrid, opt)
        out = hybrid.full_state("params")
        live = tmp_path / "live.npz"
        ck.export_state_dict(None, live, model=hybrid)
        return out
    got = simpar.launch(into_zero3, 4)[0]
    assert worst(compare(got, params)) == 0.0
    assert worst(compare(ck.import_state_dict(tmp_path / "live.npz"), params)) == 0.0


def test_moe_experts_reshard_over_ep(tmp_path):
    """Experts saved from ep2 (ZeRO-1 over edp) reload into ep4 (ZeRO-2) and ep1."""
    kw = dict(steps=4, moe_experts=4, moe_k=2)
    full, params = simpar.launch(lambda c: run(c, P(dp=4, ep=2), 1, save=str(tmp_path),
                                               save_every=2, **kw), 4)[0]
    for layout, zero in ((P(dp=4, ep=4), 2), (P(dp=4), 0)):
        got, got_params = simpar.launch(
            lambda c: run(c, layout, zero, resume=str(tmp_path / "step-00000002"), **kw), 4)[0]
        assert rel_error(got, full[2:]) <= TOL
        assert worst(compare(got_params, params)) <= TOL


SGD = dict(optimizer="sgd", hyper=dict(lr=0.05, momentum=0.9, weight_decay=0.01))


def test_sgd_momentum_reshards_and_the_optimizer_kind_is_checked(tmp_path):
    full = simpar.launch(lambda c: run_hybrid(c, P(dp=2, tp=2), 2, tmp_path, save_at=2,
                                              **SGD), 4)[0]
    got = simpar.launch(lambda c: run_hybrid(c, P(dp=4), 3, tmp_path, load=True, **SGD), 4)[0]
    assert rel_error(got[0], full[0][2:]) <= TOL
    assert worst(compare(got[1], full[1])) <= TOL

    def wrong_kind(comm):
        from tests.parallel.hybrid_checks import Layout, make_reference
        model = build_model(make_reference(Layout("s", P(dp=2))), Mesh(comm, P(dp=2)))
        try:
            ck.load(tmp_path, model, DistributedOptimizer(model, 1, "adamw", lr=1e-2))
        except ValueError as e:
            return str(e)
    msgs = simpar.launch(wrong_kind, 2)
    assert all("checkpoint optimizer is 'sgd', the run's is 'adamw'" in m for m in msgs), msgs


# ---------------------------------------------- context-parallel layouts
RING = {"context_parallel": "ring"}


def _resumed_equal(got, want, same: bool) -> None:
    """Losses and final parameters of a resumed run against the uninterrupted
    one: bit for bit on the same layout, else within TOL."""
    (losses, params), (full_losses, full_params) = got, want
    if same:
        np.testing.assert_array_equal(losses, full_losses)
        for k in full_params:
            np.testing.assert_array_equal(params[k], full_params[k])
    else:
        assert rel_error(losses, full_losses) <= TOL
        assert worst(compare(params, full_params)) <= TOL


def test_cp2_checkpoint_resumes_on_one_process_and_other_layouts(tmp_path):
    """cp ranks replicate every parameter: only cp rank 0 writes it (each element
    once), and the index records cp.  Saved by ``train`` at cp2 (ZeRO-0)."""
    full, params = simpar.launch(lambda c: run(c, P(cp=2), 0, save=str(tmp_path),
                                               save_every=4), 2)[0]
    step4 = tmp_path / "step-00000004"
    layout = ck.read_index(step4)["layout"]
    assert (layout["cp"], layout["dp"], layout["world_size"]) == (2, 1, 2), layout
    for resume, zero in ((P(), 0), (P(dp=2), 1), (P(cp=2), 0)):
        got = simpar.launch(lambda c: run(c, resume, zero, resume=str(step4)),
                            resume.world_size)[0]
        _resumed_equal(got, (full[4:], params), same=resume == P(cp=2))


def test_cp2xdp2_zero1_checkpoint_resumes_anywhere(tmp_path):
    """ZeRO-1 over dp x cp: each rank writes its shard of the optimizer state."""
    full = simpar.launch(lambda c: run_hybrid(c, P(cp=2, dp=2), 1, tmp_path, save_at=2,
                                              options=RING), 4)[0]
    index = ck.read_index(tmp_path)
    assert index["layout"]["cp"] == 2 and index["optimizer"]["zero"] == 1
    assert len({e["file"] for e in index["entries"] if e["kind"] == "m"}) == 4   # 4 owners
    for layout, stage, opts in ((P(), 0, {}), (P(dp=2, tp=2), 2, {}),
                                (P(cp=2, dp=2), 1, RING)):
        got = simpar.launch(lambda c: run_hybrid(c, layout, stage, tmp_path, load=True,
                                                 options=opts), layout.world_size)[0]
        _resumed_equal(got, (full[0][2:], full[1]), same=stage == 1)


def test_params_only_checkpoint_from_cp2xdp2_holds_each_element_once(tmp_path):
    """``save`` without an optimizer (the ``_param_pieces`` path) at cp2 x dp2."""
    from tests.parallel.hybrid_checks import Layout, make_reference
    lay = Layout("c", P(cp=2, dp=2), RING)

    def save(comm):
        model = build_model(make_reference(lay), Mesh(comm, lay.config), **lay.options)
        return ck.save(tmp_path, model)
    simpar.launch(save, 4)
    sd = ck.checkpoint_state_dict(tmp_path)              # coverage checked: once each
    ref = make_reference(lay).state_dict()
    assert set(sd) == set(ref) and worst(compare(sd, ref)) == 0.0


def test_moe_at_cp2xdp2xep2_zero1_resumes_without_cp(tmp_path):
    """An MoE GPT under context parallelism (every cp rank holds the same MoE
    layers: only cp rank 0 writes them) reloads at dp2×ep2 (ZeRO-2) and dp2
    (one rank holding every expert): the routing groups (dp·m) are unchanged."""
    kw = dict(steps=4, moe_experts=4, moe_k=2)
    full, params = simpar.launch(lambda c: run(c, P(cp=2, dp=2, ep=2), 1, save=str(tmp_path),
                                               save_every=2, **kw), 4)[0]
    step2 = str(tmp_path / "step-00000002")
    for layout, zero in ((P(dp=2, ep=2), 2), (P(dp=2), 0)):
        got = simpar.launch(lambda c: run(c, layout, zero, resume=step2, **kw),
                            layout.world_size)[0]
        _resumed_equal(got, (full[2:], params), same=False)
