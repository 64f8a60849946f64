"""Sharded checkpoints that reload into any layout (tp, pp, dp, ep and ZeRO stage
may all change), written atomically; export to / import from one full reference
``state_dict`` (npz).

The idea is the one of PyTorch's distributed checkpoint and Megatron's
``dist_checkpointing``: every rank writes **its own shards**, and a small index
says, for every shard, **which slice of which full tensor** it holds — so a reader
on another layout can find the pieces it needs without knowing how the writer was
cut.  For one saved piece of the full tensor ``T`` (reference name and shape)::

    entry = {tensor: "blocks.0.attn.qkv.W", kind: "param" | "m" | "v" | "momentum",
             box:  [[lo, hi], ...]      # a rectangular slice T[lo0:hi0, lo1:hi1, ...]
             flat: [a, b],              # elements a..b-1 of that box, row-major
             file: "rank00003.npz", key: "17", sha256: "..."}

A tensor-parallel shard is a few boxes (a column block; three for a fused
``[q | k | v]`` weight; vocabulary padding in none); a ZeRO shard cuts the
flattened local tensor anywhere, and the part of a box inside a flat range is
again a flat range of the box.  Every element of every tensor is saved exactly
once (tp-replicated tensors by tp rank 0, data replicas — over ``dp × cp``, or
``edp`` for experts — by their ZeRO owner or the group's rank 0, routers by ep
rank 0, a tied ``wte`` by the first stage:
:meth:`~simpar.parallel.hybrid.HybridModel.counted_once`); the reader checks that
the entries cover each tensor exactly once.

Directory layout (``save(root, ...)``)::

    root/latest                     the name of the newest complete checkpoint
    root/step-00000040/index.json   model config, layout, optimizer, trainer state, entries
    root/step-00000040/rank00000.npz ...
    root/.tmp-step-00000050/        a save in progress (or killed): never read

Writes are atomic: the shards and the index go to ``.tmp-...``, which is renamed
to ``step-...`` when complete, and only then ``latest`` is replaced (``os.replace``
of a file), so a save killed half-way leaves the previous checkpoint loadable.
Loading checks the model configuration, every tensor's shape, every shard's
checksum and the coverage, and fails with an error naming the tensor or file —
on every rank, never with a wrong model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

__all__ = ["save", "load", "read_index", "export_state_dict", "import_state_dict",
           "checkpoint_state_dict", "resolve", "FORMAT"]

FORMAT, VERSION = "simpar-checkpoint", 1
INDEX, LATEST = "index.json", "latest"


# ---------------------------------------------------------------- the cuts
def _config_dict(config) -> dict:
    """The model configuration as JSON holds it (tuples become lists)."""
    return json.loads(json.dumps(asdict(config) if is_dataclass(config) else dict(config)))


def tensor_maps(model) -> dict[str, tuple[tuple, np.ndarray | None]]:
    """``{name: (full shape, map)}`` for every tensor this rank holds: ``map[i]``
    is the flat index in the full tensor of local element ``i`` (−1: padding);
    ``None`` when the local tensor is the whole tensor.  Collective over ``tp``
    (one all-gather of element codes per sharded tensor)."""
    out = {}
    for s in sorted(model.stages):
        st = model.stages[s]
        sharded = st.tp_sharded()
        for name, local in st.parameters().items():
            if name in out:
                continue
            if name not in sharded:
                out[name] = (tuple(local.shape), None)
                continue
            n, r = local.size, model.mesh.tp.rank
            code = (r * n + np.arange(n, dtype=np.float64) + 1).reshape(local.shape)
            full = st.full_tensor(name, code)              # every rank's codes, cut as T
            flat = full.reshape(-1)
            mine = np.nonzero((flat - 1) // n == r)[0]
            m = np.full(n, -1, dtype=np.int64)
            m[(flat[mine] - 1).astype(np.int64) % n] = mine
            out[name] = (tuple(full.shape), m)
    return out


def _boxes(local_shape: tuple, full_shape: tuple, m: np.ndarray | None):
    """The local tensor as boxes of the full tensor: ``[(full box, local box)]``,
    slices per axis.  A shard differs from the full tensor along one axis."""
    if m is None:
        whole = tuple((0, d) for d in full_shape)
        return [(whole, whole)]
    axes = [i for i, (a, b) in enumerate(zip(local_shape, full_shape)) if a != b] or [0]
    if len(axes) != 1:
        raise ValueError(f"a shard of shape {local_shape} of a tensor {full_shape} is cut "
                         "along more than one axis")
    ax = axes[0]
    mm = m.reshape(local_shape)
    stride = int(np.prod(full_shape[ax + 1:], dtype=np.int64))
    line = mm[(0,) * ax + (slice(None),) + (0,) * (len(local_shape) - ax - 1)]
    f = np.where(line >= 0, (line // stride) % full_shape[ax], -1)
    boxes, j = [], 0
    while j < len(f):
        if f[j] < 0:
            j += 1
            continue
        k = j
        while k + 1 < len(f) and f[k + 1] == f[k] + 1:
            k += 1
        fb = tuple((int(f[j]), int(f[k]) + 1) if i == ax else (0, d)
                   for i, d in enumerate(full_shape))
        lb = tuple((j, k + 1) if i == ax else (0, d) for i, d in enumerate(local_shape))
        boxes.append((fb, lb))
        j = k + 1
    check = np.full(mm.shape, -1, dtype=np.int64)  # the boxes must reproduce the map
    full_idx = np.arange(int(np.prod(full_shape, dtype=np.int64))).reshape(full_shape)
    for fb, lb in boxes:
        check[_sl(lb)] = full_idx[_sl(fb)]
    if not np.array_equal(check, mm):
        raise ValueError(f"a shard of shape {local_shape} of a tensor {full_shape} is not "
                         "a union of slices along one axis")
    return boxes


def _sl(box) -> tuple:
    return tuple(slice(a, b) for a, b in box)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# --------------------------------------------------------------------- save
def resolve(path) -> Path:
    """The checkpoint directory of ``path``: a root's ``latest``, or ``path`` itself
    when it holds an ``index.json``."""
    path = Path(path)
    if (path / INDEX).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / INDEX).is_file():
            return target
        raise ValueError(f"checkpoint {path}: 'latest' names {target.name}, which has no "
                         f"{INDEX}")
    raise FileNotFoundError(f"no checkpoint at {path} (neither {INDEX} nor {LATEST})")


def _write_shard(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def save(root, model, optimizer=None, trainer: dict | None = None, *, step: int = 0,
         keep: int = 2) -> Path | None:
    """Save this layout's model (and ZeRO/plain optimizer state) under ``root``
    as ``step-{step:08d}``; ``trainer``: JSON-able state (step, learning-rate
    schedule position, data position, RNG states).  Collective over the world;
    returns the checkpoint directory.  ``keep``: complete checkpoints kept."""
    world = model.mesh.world
    _check_save(optimizer, step, trainer)
    world.agree("checkpoint save (root, step)", (str(root), int(step)))
    root, name = Path(root), f"step-{int(step):08d}"
    tmp = root / f".tmp-{name}"
    if world.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)                      # a killed save of the same step
        tmp.mkdir()
    world.barrier()
    maps = tensor_maps(model)
    fname = f"rank{world.rank:05d}.npz"
    pieces = optimizer.owned_pieces() if optimizer is not None else _param_pieces(model)
    entries, arrays = _entries(pieces, model.parameters(), maps, fname)
    _write_shard(tmp / fname, arrays)
    local = model.parameters()
    tensors = {n: {"shape": list(shape), "dtype": str(local[n].dtype)}
               for n, (shape, _) in maps.items()}
    views = world.gather_objects((entries, tensors))
    if world.rank == 0:
        index = _index(model, optimizer, trainer, step, views)
        with open(tmp / INDEX, "w") as f:
            json.dump(index, f, indent=1)
        _commit(root, tmp, name, keep)
    world.barrier()
    return root / name


def _check_save(optimizer, step, trainer) -> None:
    """The arguments, on every rank before any message."""
    from .parallel.zero import DistributedOptimizer
    if optimizer is not None and not isinstance(optimizer, DistributedOptimizer):
        raise TypeError(f"optimizer must be a DistributedOptimizer (ZeRO stage 0-3), got "
                        f"{type(optimizer).__name__}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    json.dumps(trainer or {})                       # JSON-able, or TypeError on every rank


def _entries(pieces, local: Mapping[str, np.ndarray], maps, fname: str):
    """Index entries and shard arrays of this rank's pieces ``(name, a, b, by
    kind)``: the part of each box of the full tensor that lies in ``a:b``."""
    entries, arrays = [], {}
    for name, a, b, by_kind in pieces:
        shape, m = maps[name]
        lshape = local[name].shape
        idx = np.arange(int(np.prod(lshape, dtype=np.int64))).reshape(lshape)
        for fbox, lbox in _boxes(lshape, shape, m):
            order = idx[_sl(lbox)].reshape(-1)        # local flat indices, box row-major
            inside = np.nonzero((order >= a) & (order < b))[0]
            if not inside.size:
                continue
            p0, p1 = int(inside[0]), int(inside[-1]) + 1
            for kind, values in by_kind.items():
                data = np.asarray(values)[order[p0:p1] - a]
                key = str(len(arrays))
                arrays[key] = data
                entries.append({"tensor": name, "kind": kind, "box": [list(x) for x in fbox],
                                "flat": [p0, p1], "file": fname, "key": key,
                                "sha256": _digest(data)})
    return entries, arrays


def _index(model, optimizer, trainer, step: int, views) -> dict:
    """The index (rank 0): model config, layout, optimizer, trainer state, and
    every rank's entries."""
    all_entries, all_tensors = [], {}
    for e, t in views:
        all_entries += e
        all_tensors.update(t)
    cfg = model.mesh.config
    return {"format": FORMAT, "version": VERSION, "step": int(step),
            "model": {"class": type(model.config).__name__,
                      "config": _config_dict(model.config)},
            "layout": {"dp": cfg.dp, "tp": cfg.tp, "pp": cfg.pp, "ep": cfg.ep,
                       "vpp": cfg.vpp, "cp": cfg.cp, "world_size": cfg.world_size},
            "optimizer": None if optimizer is None else {
                "kind": optimizer.kind, "zero": optimizer.stage, "t": optimizer.t,
                "hyper": _jsonable(optimizer.inner.hyperparameters())},
            "trainer": trainer or {},
            "tensors": all_tensors, "entries": all_entries}


def _commit(root: Path, tmp: Path, name: str, keep: int) -> None:
    """Rank 0: the complete checkpoint into place, then ``latest``; old ones go."""
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)                          # complete: into place
    _write_atomic(root / LATEST, name + "\n")       # and only then the pointer
    done = sorted(p for p in root.glob("step-*") if (p / INDEX).is_file())
    for old in done[:-keep] if keep else []:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _param_pieces(model):
    """Parameters only, each element once (:meth:`HybridModel.counted_once`: rank 0
    of the ``dp × cp`` or ``edp`` replicas, tp rank 0 for replicated tensors, ...)."""
    for name, p in model.parameters().items():
        if model.counted_once(name):
            yield name, 0, p.size, {"param": p.reshape(-1)}


# --------------------------------------------------------------------- load
def read_index(path) -> dict:
    """The index of the checkpoint at ``path`` (a root or a step directory), checked."""
    d = resolve(path)
    try:
        index = json.loads((d / INDEX).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint index {d / INDEX} is unreadable: {e}") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{d / INDEX} is not a {FORMAT} version {VERSION} index")
    index["_dir"] = str(d)
    return index


class _Source:
    """Full tensors assembled from a checkpoint's entries (checksums, coverage)."""

    def __init__(self, index: dict) -> None:
        self.index, self.dir = index, Path(index["_dir"])
        self.by = {}
        for e in index["entries"]:
            self.by.setdefault((e["tensor"], e["kind"]), []).append(e)
        self.files: dict[str, object] = {}

    def _file(self, name: str):
        if name not in self.files:
            path = self.dir / name
            try:
                self.files[name] = np.load(path)
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                raise ValueError(f"checkpoint shard {path} is unreadable (truncated or "
                                 f"corrupted): {e}") from None
        return self.files[name]

    def shape(self, tensor: str) -> tuple:
        meta = self.index["tensors"].get(tensor)
        if meta is None:
            raise ValueError(f"checkpoint {self.dir} has no tensor {tensor!r}")
        return tuple(meta["shape"])

    def full(self, tensor: str, kind: str) -> np.ndarray:
        meta = self.index["tensors"].get(tensor)
        if meta is None:
            raise ValueError(f"checkpoint {self.dir} has no tensor {tensor!r}")
        entries = self.by.get((tensor, kind))
        if not entries:
            raise ValueError(f"checkpoint {self.dir} has no {kind!r} state for {tensor!r}")
        shape = tuple(meta["shape"])
        out = np.zeros(shape, np.dtype(meta["dtype"]))
        count = np.zeros(shape, np.int64)
        for e in entries:
            path = self.dir / e["file"]
            archive = self._file(e["file"])            # ValueError naming the file
            try:
                data = np.asarray(archive[e["key"]])
            except (KeyError, OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
                raise ValueError(f"checkpoint shard {path}: cannot read {kind} of {tensor!r} "
                                 f"(truncated or corrupted): {err}") from None
            if _digest(data) != e["sha256"]:
                raise ValueError(f"checkpoint shard {path}: checksum mismatch for {kind} of "
                                 f"{tensor!r} (corrupted file)")
            box = _sl(e["box"])
            p0, p1 = e["flat"]
            region = out[box].copy().reshape(-1)
            hits = count[box].copy().reshape(-1)
            if data.size != p1 - p0:
                raise ValueError(f"checkpoint shard {path}: {kind} of {tensor!r} holds "
                                 f"{data.size} values for {p1 - p0} positions")
            region[p0:p1] = data
            hits[p0:p1] += 1
            out[box] = region.reshape(out[box].shape)
            count[box] = hits.reshape(count[box].shape)
        if (count != 1).any():
            raise ValueError(f"checkpoint {self.dir}: {kind} of {tensor!r} is not covered "
                             f"exactly once ({int((count == 0).sum())} elements missing, "
                             f"{int((count > 1).sum())} written twice)")
        return out


class _DictSource:
    """Full tensors from a reference ``state_dict`` (parameters only)."""

    def __init__(self, sd: Mapping[str, np.ndarray], origin: str) -> None:
        self.sd, self.origin = sd, origin

    def shape(self, tensor: str) -> tuple:
        if tensor not in self.sd:
            raise ValueError(f"{self.origin} has no tensor {tensor!r}")
        return tuple(np.shape(self.sd[tensor]))

    def full(self, tensor: str, kind: str) -> np.ndarray:
        if tensor not in self.sd:
            raise ValueError(f"{self.origin} has no tensor {tensor!r}")
        return np.asarray(self.sd[tensor])


def _check_config(index: dict, model) -> None:
    want, have = index["model"], {"class": type(model.config).__name__,
                                  "config": _config_dict(model.config)}
    if want["class"] != have["class"]:
        raise ValueError(f"checkpoint holds a {want['class']}, the model is a {have['class']}")
    diff = [f"{k}: checkpoint {want['config'].get(k)!r}, model {have['config'].get(k)!r}"
            for k in sorted(set(want["config"]) | set(have["config"]))
            if want["config"].get(k) != have["config"].get(k)]
    if diff:
        raise ValueError("checkpoint model config does not match the model: " + "; ".join(diff))


def _prepare(source, model, maps, kinds) -> dict:
    """Every local tensor this rank needs, ``{(name, kind): flat values}``, cut from
    the full tensors of ``source`` — all checks, no communication."""
    local = model.parameters()
    cache: dict = {}

    def local_of(name: str, kind: str) -> np.ndarray:
        if (name, kind) not in cache:
            shape, m = maps[name]
            have = source.shape(name)
            if tuple(have) != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(have)} in the "
                                 f"checkpoint, the model needs {tuple(shape)}")
            try:
                full = source.full(name, kind)
            except (IndexError, TypeError) as e:
                raise ValueError(f"checkpoint {kind} of {name!r} does not fit its shape "
                                 f"{tuple(have)}: {e}") from None
            if tuple(full.shape) != tuple(shape):
                raise ValueError(f"tensor {name!r} has shape {tuple(full.shape)} in the "
                                 f"checkpoint, the model needs {tuple(shape)}")
            flat = full.reshape(-1)
            if m is None:
                vals = flat.copy()
            else:
                vals = np.zeros(m.size, flat.dtype)
                vals[m >= 0] = flat[m[m >= 0]]
            cache[(name, kind)] = vals.astype(local[name].dtype, copy=False)
        return cache[(name, kind)]

    for name in local:
        for kind in ("param",) + tuple(kinds):
            local_of(name, kind)
    return cache


def _load_local(source, model, optimizer, maps, kinds) -> None:
    """Check and cut on every rank (the same error everywhere), then write
    (stages 1-2 all-gather their parameters)."""
    cache = {}
    _collectively(model.mesh.world, lambda: cache.update(_prepare(source, model, maps, kinds)))
    if optimizer is None:
        for name, p in model.parameters().items():
            p.reshape(-1)[...] = cache[(name, "param")]
        return
    optimizer.load_pieces(lambda name, a, b, kind: cache[(name, kind if kind in kinds
                                                          else "param")][a:b])


def _collectively(world, fn):
    """Run ``fn`` on every rank; if it fails on any, the same ``ValueError`` on all."""
    try:
        fn()
        msg = None
    except (ValueError, KeyError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    msgs = world.gather_objects(msg)
    bad = sorted({m for m in msgs if m is not None})
    if bad:
        raise ValueError("; ".join(bad))


def load(path, model, optimizer=None) -> dict:
    """Load the checkpoint at ``path`` (root or step directory) into ``model`` (any
    layout) and ``optimizer`` (any ZeRO stage; ``None``: parameters only).
    Returns the trainer state saved with it.  Collective over the world."""
    world = model.mesh.world
    world.agree("checkpoint load (path, ZeRO stage or none)",
                (str(path), None if optimizer is None else optimizer.stage))
    index = None

    def read():
        nonlocal index
        index = read_index(path)
        _check_config(index, model)
        if optimizer is not None:
            saved = index.get("optimizer")
            if saved is None:
                raise ValueError(f"checkpoint {index['_dir']} holds no optimizer state")
            if saved["kind"] != optimizer.kind:
                raise ValueError(f"checkpoint optimizer is {saved['kind']!r}, the run's is "
                                 f"{optimizer.kind!r}")
    _collectively(world, read)
    maps = tensor_maps(model)
    source = _Source(index)
    kinds = ()
    if optimizer is not None:
        kinds = optimizer.inner._state_kinds
    _load_local(source, model, optimizer, maps, kinds)
    if optimizer is not None:
        saved = index["optimizer"]
        optimizer.inner._set_hyper(**saved["hyper"])
        optimizer.inner.state["t"] = int(saved["t"])
    world.barrier()
    return dict(index.get("trainer", {}))


# ------------------------------------------------ one full reference state_dict
def checkpoint_state_dict(path) -> dict[str, np.ndarray]:
    """Every parameter of a checkpoint at its reference shape (one process, no
    communication): the reference ``state_dict``."""
    index = read_index(path)
    source = _Source(index)
    return {name: source.full(name, "param") for name in index["tensors"]}


def export_state_dict(source, path, model=None) -> Path:
    """Write one npz of the full reference ``state_dict`` (GPT-2-style names):
    ``source`` is a checkpoint path, or ``None`` with a live ``model`` (collective:
    gathered from every rank, written by rank 0)."""
    path = Path(path)
    if source is not None:
        sd = checkpoint_state_dict(source)
    else:
        sd = model.full_state("params")
        if model.mesh.world.rank != 0:
            model.mesh.world.barrier()
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **sd)
    os.replace(tmp, path)
    if source is None:
        model.mesh.world.barrier()
    return path


def import_state_dict(path, model=None, optimizer=None):
    """Read a reference ``state_dict`` npz; with ``model``, load it into that model
    (any layout, any ZeRO stage: collective), else return the dict."""
    try:
        with np.load(path) as f:
            sd = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"state dict {path} is unreadable: {e}") from None
    if model is None:
        return sd
    world = model.mesh.world
    maps = tensor_maps(model)

    def check():
        missing = sorted(set(maps) - set(sd))
        if missing:
            raise ValueError(f"state dict {path} lacks {missing}")
    _collectively(world, check)
    source = _DictSource(sd, str(path))
    if optimizer is None:
        _load_local(source, model, None, maps, ())
    else:                                          # parameters only; moments untouched
        _load_params_only(source, model, optimizer, maps)
    world.barrier()
    return sd


def _load_params_only(source, model, optimizer, maps) -> None:
    kinds = optimizer.inner._state_kinds
    saved = {k: {key: a.copy() for key, a in optimizer.inner.state[k].items()} for k in kinds}
    _load_local(source, model, optimizer, maps, ())
    for k in kinds:                                # restore the moments
        for key, a in saved[k].items():
            optimizer.inner.state[k][key][...] = a
