"""Checkpoints of optimizer, scheduler and [`TrainState`][funcopt.TrainState] states.

Any pytree of arrays saves: an `OptState`, a scheduler state, a
`TrainState` (its optimizer is static: it comes from `like` on restore),
or a dict of them. Two formats, the same API:

```python
fo.checkpoint.save("ckpt.npz", {"train": ts, "sched": sched_state})
tree = fo.checkpoint.restore("ckpt.npz", like={"train": ts0, "sched": s0})

fo.checkpoint.save("ckpt_dir", tree, format="orbax")     # orbax-checkpoint
tree = fo.checkpoint.restore("ckpt_dir", like=..., format="orbax")
```

`like` is a tree of the same structure (e.g. `TrainState.create(params,
opt)` and `sched.init(...)` fresh); its key paths, shapes and dtypes are
checked against the checkpoint, and a difference raises `ValueError` naming
the leaf. Restored values are bit-identical to the saved ones, so training
resumed from a checkpoint continues exactly as the uninterrupted run. An
optimizer state is saved with its buffers per leaf (`OptState.unpacked`)
and restored in `like`'s layout (a `TrainState`'s gradients and flags too),
so a checkpoint does not depend on which buffers a machine keeps packed
(`funcopt.flat.set_policy`).

**The light format** (`format="npz"`, the default; numpy only) is one zip
file: `manifest.json` (format version, the tree's structure as text, and per
leaf its key path, dtype and shape) plus one `.npy` per leaf; `unzip -p
ckpt.npz manifest.json` shows it and `numpy.load` reads it. It is written
to a temporary file in the same folder, flushed and fsynced, then renamed
over the target (`os.replace`, atomic on POSIX and Windows) and the folder
fsynced: a process killed at any point leaves either the previous checkpoint
or the new one, never a partial file (a leftover `.tmp-*` file is ignored
and overwritten by nothing; delete it at leisure).

**orbax** (`format="orbax"`, needs the `checkpoint` extra) writes orbax's
standard PyTree checkpoint directory. orbax finalizes into a temporary
directory itself; the swap over an existing checkpoint is: rename the old
directory aside (`<path>.old-*`), rename the new one into place, delete the
old one. If a process dies between the two renames,
[`restore`][funcopt.checkpoint.restore] finds the previous checkpoint under its aside
name.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _multi_tensor
from ._core import OptState
from .train_state import TrainState

FORMAT = "funcopt-npz"
VERSION = 1


def _before_commit(path: str) -> None:
    """Called after a checkpoint is fully written, before it replaces the
    previous one (a test hook: a crash here must leave the old one)."""


# --------------------------------------------------------------------------
# the tree
# --------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "opt_state", "grads", "grad_defined"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class _TrainStatePerLeaf:
    """A `TrainState` as a checkpoint holds it: gradients and flags per leaf
    (`grads`, `grad_defined`), under the key paths `TrainState` had before
    it kept them packed, so that older checkpoints restore too."""

    params: Any
    opt_state: Any
    grads: Any
    grad_defined: Any


def _per_leaf(tree: Any) -> Any:
    """`tree` with each optimizer state's buffers, and each `TrainState`'s
    gradients and flags, per leaf: a checkpoint does not depend on where a
    state keeps them packed (`OptState.unpacked`; packed on one CPU device,
    per leaf on a GPU)."""

    def per_leaf(x):
        if isinstance(x, TrainState):
            return _TrainStatePerLeaf(
                x.params, _per_leaf(x.opt_state), x.grads, x.grad_defined
            )
        return x.unpacked() if isinstance(x, OptState) else x

    return jax.tree.map(
        per_leaf, tree, is_leaf=lambda x: isinstance(x, OptState | TrainState)
    )


def _packed_like(restored: Any, like: Any) -> Any:
    """`restored` (per leaf) with each optimizer state and `TrainState` laid
    out as `like`'s."""

    def lay_out(r, ref):
        if isinstance(ref, TrainState):
            opt_state = _packed_like(r.opt_state, ref.opt_state)
            return ref._with_per_leaf(r.params, opt_state, r.grads, r.grad_defined)
        layout = _multi_tensor.packed_layout(ref) if isinstance(ref, OptState) else None
        if layout is None:
            return r
        return _multi_tensor.pack_into(layout, r, _multi_tensor.buffer_specs_of(ref))

    return jax.tree.map(
        lay_out,
        restored,
        like,
        is_leaf=lambda x: isinstance(x, OptState | _TrainStatePerLeaf),
    )


def _flatten(tree: Any) -> tuple[list[str], list[np.ndarray], Any]:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(_per_leaf(tree))
    paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
    arrays = [np.asarray(jax.device_get(leaf)) for _, leaf in leaves_with_path]
    return paths, arrays, treedef


def _check_like(manifest_leaves: list[dict], like: Any) -> tuple[list, Any]:
    paths, like_leaves, treedef = _flatten(like)
    saved = [m["path"] for m in manifest_leaves]
    if saved != paths:
        only_saved = [p for p in saved if p not in paths]
        only_like = [p for p in paths if p not in saved]
        raise ValueError(
            "the checkpoint's tree differs from `like`: "
            f"{len(saved)} leaves saved, {len(paths)} in like; only in the "
            f"checkpoint: {only_saved[:5]}, only in like: {only_like[:5]}"
            + ("" if only_saved or only_like else " (same leaves, another order)")
        )
    for m, leaf in zip(manifest_leaves, like_leaves):
        if m["dtype"] != str(leaf.dtype) or tuple(m["shape"]) != leaf.shape:
            raise ValueError(
                f"leaf {m['path']}: the checkpoint holds {m['dtype']}"
                f"{tuple(m['shape'])}, like has {leaf.dtype}{leaf.shape}"
            )
    return like_leaves, treedef


def _rebuild(treedef, values: list[np.ndarray], like: Any) -> Any:
    like_leaves = jax.tree.leaves(_per_leaf(like))
    out: list[Any] = []
    for value, ref in zip(values, like_leaves):
        if isinstance(ref, jax.Array):
            out.append(jnp.asarray(value, dtype=ref.dtype))
        elif isinstance(ref, np.ndarray):
            out.append(np.asarray(value, dtype=ref.dtype))
        else:  # Python scalars
            out.append(type(ref)(value.item()) if np.ndim(value) == 0 else value)
    return _packed_like(jax.tree.unflatten(treedef, out), like)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# the light format
# --------------------------------------------------------------------------


def _npy_bytes(arr: np.ndarray) -> tuple[bytes, str | None]:
    """`.npy` bytes; dtypes numpy cannot describe (bfloat16, ...) are stored
    as raw unsigned ints of the same width (the manifest keeps the dtype)."""
    stored = None
    if np.dtype(arr.dtype.str) != arr.dtype:  # not a plain numpy dtype
        stored = f"uint{arr.dtype.itemsize * 8}"
        arr = arr.view(stored)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue(), stored


def save_npz(path: str | os.PathLike, tree: Any) -> None:
    """Save `tree` to `path` (one file), atomically; see the module doc."""
    path = os.fspath(path)
    paths, arrays, treedef = _flatten(tree)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "treedef": str(treedef),
        "leaves": [],
    }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=os.path.basename(path) + ".tmp-", dir=folder, suffix=".part"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
                for i, (p, arr) in enumerate(zip(paths, arrays)):
                    data, stored = _npy_bytes(arr)
                    z.writestr(f"leaf_{i}.npy", data)
                    manifest["leaves"].append(
                        {
                            "path": p,
                            "file": f"leaf_{i}.npy",
                            "dtype": str(arr.dtype),
                            "shape": list(arr.shape),
                            "stored_as": stored,
                        }
                    )
                z.writestr("manifest.json", json.dumps(manifest, indent=1))
            f.flush()
            os.fsync(f.fileno())
        _before_commit(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a light-format checkpoint (structure, dtypes, shapes)."""
    with zipfile.ZipFile(os.fspath(path)) as z:
        return json.loads(z.read("manifest.json"))


def restore_npz(path: str | os.PathLike, like: Any) -> Any:
    """Restore a tree saved by `save_npz`, shaped like `like`."""
    path = os.fspath(path)
    with zipfile.ZipFile(path) as z:
        manifest = json.loads(z.read("manifest.json"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a funcopt checkpoint")
        _, treedef = _check_like(manifest["leaves"], like)
        values = []
        for m in manifest["leaves"]:
            arr = np.lib.format.read_array(
                io.BytesIO(z.read(m["file"])), allow_pickle=False
            )
            if m.get("stored_as"):
                arr = arr.view(jnp.dtype(m["dtype"]))
            values.append(arr.reshape(m["shape"]))
    return _rebuild(treedef, values, like)


# --------------------------------------------------------------------------
# orbax
# --------------------------------------------------------------------------


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - a test dependency
        raise ImportError(
            "format='orbax' needs orbax-checkpoint: pip install 'funcopt[checkpoint]'"
        ) from e
    return ocp


def _as_dict(tree: Any) -> tuple[dict[str, Any], list[str], Any]:
    """orbax keeps dicts of arrays well: key paths as flat keys."""
    paths, arrays, treedef = _flatten(tree)
    return {f"leaf_{i}": a for i, a in enumerate(arrays)}, paths, treedef


def save_orbax(path: str | os.PathLike, tree: Any) -> None:
    """Save `tree` as an orbax PyTree checkpoint directory (module doc)."""
    ocp = _orbax()
    path = os.path.abspath(os.fspath(path))
    flat, paths, treedef = _as_dict(tree)
    tag = uuid.uuid4().hex[:8]
    new = f"{path}.new-{tag}"
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.join(new, "state"), flat)
    manifest = {
        "format": "funcopt-orbax",
        "version": VERSION,
        "treedef": str(treedef),
        "leaves": [
            {"path": p, "key": k, "dtype": str(a.dtype), "shape": list(a.shape)}
            for p, (k, a) in zip(paths, flat.items())
        ],
    }
    with open(os.path.join(new, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(new)
    try:
        _before_commit(path)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{tag}"
        os.rename(path, old)
    os.rename(new, path)
    _fsync_dir(os.path.dirname(path))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _find_orbax(path: str) -> str:
    if os.path.exists(path):
        return path
    folder, base = os.path.split(path)
    aside = sorted(f for f in os.listdir(folder or ".") if f.startswith(base + ".old-"))
    if aside:  # died between the two renames: the previous checkpoint
        return os.path.join(folder, aside[-1])
    raise FileNotFoundError(path)


def restore_orbax(path: str | os.PathLike, like: Any) -> Any:
    """Restore a tree saved by `save_orbax`, shaped like `like`."""
    ocp = _orbax()
    path = _find_orbax(os.path.abspath(os.fspath(path)))
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    like_leaves, treedef = _check_like(manifest["leaves"], like)
    target = {
        m["key"]: np.zeros(m["shape"], dtype=leaf.dtype)
        for m, leaf in zip(manifest["leaves"], like_leaves)
    }
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target
    )
    with ocp.PyTreeCheckpointer() as ckptr:
        flat = ckptr.restore(
            os.path.join(path, "state"), item=target, restore_args=restore_args
        )
    values = [np.asarray(flat[m["key"]]) for m in manifest["leaves"]]
    return _rebuild(treedef, values, like)


# --------------------------------------------------------------------------
# the API
# --------------------------------------------------------------------------


def save(path: str | os.PathLike, tree: Any, *, format: str = "npz") -> None:
    """Save a state tree: `format="npz"` (one file, numpy only) or
    `"orbax"` (a directory); a crash mid-save keeps the previous one.
    """
    if format == "npz":
        return save_npz(path, tree)
    if format == "orbax":
        return save_orbax(path, tree)
    raise ValueError(f"format must be 'npz' or 'orbax', got {format!r}")


def restore(path: str | os.PathLike, like: Any, *, format: str = "npz") -> Any:
    """Restore a state tree shaped like `like` (module doc)."""
    if format == "npz":
        return restore_npz(path, like)
    if format == "orbax":
        return restore_orbax(path, like)
    raise ValueError(f"format must be 'npz' or 'orbax', got {format!r}")


__all__ = [
    "read_manifest",
    "restore",
    "restore_npz",
    "restore_orbax",
    "save",
    "save_npz",
    "save_orbax",
]
