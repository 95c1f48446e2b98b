"""Orbax checkpointing: the latest training states for resume, and the best weights by val mIoU.

Two managers under separate policies, because `best_fn` with `max_to_keep` in one manager keeps the N best
and deletes the latest, which breaks resume:
  `WORKDIR/checkpoints/<step>/{state,meta}`: full TrainState (optimizer included), the last `max_to_keep`.
  `WORKDIR/best/<step>/{variables,meta}`: params and batch_stats only, of the best evaluation so far.
`meta` is JSON (step, scores, model settings, a SHA-256 of the state); nothing is pickled.
Released weights (`fastscnn_jax/weights/*.msgpack`) are one msgpack file of params, batch_stats and meta.
`load_model` reads any of these and builds the network its metadata describes; it, like the rest of this
module, imports without TensorFlow.

Faults (docs/reliability.md): orbax writes a save into `<step>.orbax-checkpoint-tmp` and renames it once
complete, so a process killed while saving leaves that folder and the previous checkpoints intact; resuming
ignores it, says so and removes it. A step that does not restore (a missing or truncated file, or a state
whose SHA-256 differs from the one saved with it) is skipped with a warning saying why and moved to
`WORKDIR/checkpoints_corrupt/`; the newest step that restores is used. If checkpoints exist but none
restores, `CheckpointError`: a run never starts again from scratch on its own.
"""

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import serialization

from fastscnn_jax import models, steps

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
# Steps that did not restore are moved here (not deleted) when an older step is resumed instead.
CORRUPT_DIR = "checkpoints_corrupt"
# orbax writes a save into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once complete.
PARTIAL_MARK = ".orbax-checkpoint-tmp"
# meta key holding `tree_digest` of the saved training state.
DIGEST_KEY = "state_sha256"
# The CamVid weights shipped with the package (see MODEL_CARD.md).
DEFAULT_WEIGHTS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "weights", "fastscnn_camvid.msgpack"
)


class CheckpointError(RuntimeError):
    """A workdir holds checkpoints, but none of them can be restored."""


def tree_digest(tree: Any) -> dict | None:
    """SHA-256 digests of a pytree: `layout` of its leaves' paths, dtypes and shapes, `sha256` of those and
    the leaves' bytes; None if a leaf is split over processes (no process holds all of it).

    orbax reads some damage back without error (a flipped bit inside a compressed chunk gives wrong values),
    so the digest of a saved state is kept in its meta and checked on restore.
    """
    layout, values = hashlib.sha256(), hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, jax.Array):
            if not leaf.is_fully_replicated:
                return None
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            leaf = leaf.addressable_data(0)
        array = np.ascontiguousarray(np.asarray(leaf))
        header = f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode()
        layout.update(header)
        values.update(header)
        values.update(array.tobytes())
    return {"layout": layout.hexdigest(), "sha256": values.hexdigest()}


def _check_digest(saved: Any, state: Any) -> None:
    """Raises ValueError if `state` differs from the state whose `tree_digest` is `saved`.

    Not checked when the state was restored onto other dtypes or shapes than it was saved with (orbax casts
    to the target's), or when either digest is missing (checkpoints written before digests were kept).
    """
    if (
        not isinstance(saved, dict)
        or (read := tree_digest(state)) is None
        or read["layout"] != saved["layout"]
    ):
        return
    if read["sha256"] != saved["sha256"]:
        raise ValueError(
            f"the state read back has SHA-256 {read['sha256']}, not the {saved['sha256']} saved with it"
        )


def _why(error: BaseException) -> str:
    """One line saying why a restore failed: the innermost cause (orbax wraps tensorstore's precise error
    in a generic one), whitespace folded, at most 300 characters."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _manager(directory: epath.Path, items: tuple[str, ...], max_to_keep: int) -> ocp.CheckpointManager:
    """A synchronous manager (a save is complete on disk when `save` returns)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(directory, options=options, item_names=items)


class Checkpoints:
    """Latest and best checkpoints of one workdir."""

    def __init__(self, workdir: str, max_to_keep: int = 2):
        """Opens (and creates) the two checkpoint folders of `workdir`."""
        self.root = epath.Path(os.path.abspath(workdir))
        self.latest = _manager(self.root / LATEST_DIR, ("state", "meta"), max_to_keep)
        self.best = _manager(self.root / BEST_DIR, ("variables", "meta"), 1)
        self.bad_steps: dict[int, str] = {}  # step -> why it did not restore
        self._warned_partial = False

    def partial_saves(self) -> list[epath.Path]:
        """Folders of saves that never completed (the process died while saving), latest and best."""
        return sorted(
            path
            for name in (LATEST_DIR, BEST_DIR)
            if (self.root / name).is_dir()
            for path in (self.root / name).iterdir()
            if PARTIAL_MARK in path.name
        )

    def latest_step(self) -> int | None:
        """Step of the newest complete training state, or None.

        With none but a partial save (a first save that was killed), logs once that it is ignored.
        """
        step = self.latest.latest_step()
        if step is None and not self._warned_partial and (partial := self.partial_saves()):
            self._warned_partial = True
            logging.warning(
                "Ignoring partial checkpoint %s (a save that never completed: the process was killed while "
                "saving); there is no complete checkpoint in %s, so training starts from step 0.",
                ", ".join(map(os.fspath, partial)),
                self.root / LATEST_DIR,
            )
        return step

    def _candidates(self) -> list[int]:
        """Steps not yet known to be bad, newest first."""
        return [s for s in sorted(self.latest.all_steps(), reverse=True) if s not in self.bad_steps]

    def _mark_bad(self, step: int, error: Exception) -> None:
        """Records (and logs) that `step` does not restore."""
        self.bad_steps[step] = _why(error)
        logging.warning(
            "Checkpoint step %d in %s does not restore; skipping it. %s",
            step,
            self.root / LATEST_DIR,
            self.bad_steps[step],
        )

    def _none_restores(self) -> CheckpointError:
        """The error for a workdir whose checkpoints all fail to restore."""
        detail = "; ".join(f"step {s}: {why}" for s, why in sorted(self.bad_steps.items(), reverse=True))
        return CheckpointError(
            f"{self.root / LATEST_DIR} holds checkpoints (steps "
            f"{', '.join(map(str, sorted(self.bad_steps, reverse=True)))}) but none restores ({detail}). "
            "Nothing was changed and training did not start from scratch: repair or move away that folder, "
            "or use a new --workdir."
        )

    def restore_state(self, abstract_state: Any) -> tuple[Any, dict]:
        """Restores the newest training state that restores, onto the shapes/shardings of `abstract_state`.

        Steps that fail (a missing or truncated file, a SHA-256 mismatch) are logged with why and moved to
        `WORKDIR/checkpoints_corrupt/`; partial saves are logged, naming the step resumed from, and removed.

        Raises:
          CheckpointError: checkpoints exist but none restores (nothing is moved or removed then).
        """
        for step in self._candidates():
            try:
                restored = self.latest.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
                meta = dict(restored.meta)
                _check_digest(meta.pop(DIGEST_KEY, None), restored.state)
            except Exception as e:  # orbax and tensorstore raise many unrelated types on damaged files
                self._mark_bad(step, e)
                continue
            self._set_aside_failures(step)
            return restored.state, meta
        raise self._none_restores()

    def _set_aside_failures(self, resumed: int) -> None:
        """Moves steps that did not restore to CORRUPT_DIR and removes partial saves (process 0 only)."""
        bad = [s for s in sorted(self.bad_steps, reverse=True) if s in self.latest.all_steps()]
        partial = self.partial_saves()
        for path in partial:
            logging.warning(
                "Ignoring partial checkpoint %s (a save that never completed: the process was killed while "
                "saving); resuming from step %d, the newest complete checkpoint.",
                path,
                resumed,
            )
        if not bad and not partial:
            return
        if jax.process_index() == 0:
            for step in bad:
                target = self.root / CORRUPT_DIR / str(step)
                suffix = 1
                while target.exists():
                    target = self.root / CORRUPT_DIR / f"{step}.{suffix}"
                    suffix += 1
                target.parent.mkdir(parents=True, exist_ok=True)
                (self.root / LATEST_DIR / str(step)).rename(target)
                logging.warning(
                    "Moved checkpoint step %d, which does not restore, to %s; resuming from step %d.",
                    step,
                    target,
                    resumed,
                )
            for path in partial:
                shutil.rmtree(path, ignore_errors=True)
        ocp.multihost.sync_global_processes("fastscnn_jax:set_aside_failed_checkpoints")
        self.latest.reload()
        self.best.reload()

    def latest_meta(self) -> dict | None:
        """JSON metadata of the newest training state whose metadata restores, or None if there is none.

        Raises:
          CheckpointError: checkpoints exist but no metadata restores.
        """
        for step in self._candidates():
            try:
                meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                if not isinstance(meta, dict):
                    raise ValueError(f"meta is {type(meta).__name__}, not a JSON object")
            except Exception as e:  # see restore_state
                self._mark_bad(step, e)
                continue
            return {k: v for k, v in meta.items() if k != DIGEST_KEY}
        if self.bad_steps:
            raise self._none_restores()
        return None

    @staticmethod
    def _save(manager: ocp.CheckpointManager, step: int, args: ocp.args.Composite) -> None:
        """Saves `step`, replacing a checkpoint of that step a run resumed from an older step left behind."""
        if step in manager.all_steps():
            logging.warning(
                "Replacing checkpoint step %d in %s (saved again after a resume).", step, manager.directory
            )
            manager.delete(step)
        manager.save(step, args=args, force=True)

    def save_state(self, step: int, state: Any, meta: dict) -> None:
        """Saves the full training state, with its SHA-256 in the metadata."""
        digest = tree_digest(state)
        meta = {**meta, DIGEST_KEY: digest} if digest is not None else meta
        self._save(
            self.latest,
            step,
            ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )

    def save_best(self, step: int, variables: Any, meta: dict) -> None:
        """Saves inference variables as the new best (the previous best is deleted)."""
        self._save(
            self.best,
            step,
            ocp.args.Composite(variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)),
        )

    def close(self) -> None:
        """Waits for pending work and releases the managers."""
        self.latest.close()
        self.best.close()


def _restore_item(directory: epath.Path, handler, args) -> Any:
    """Restores one checkpoint item folder."""
    with ocp.Checkpointer(handler) as checkpointer:
        return checkpointer.restore(directory, args=args)


def _restore_arrays(directory: epath.Path) -> Any:
    """Restores an array tree as host numpy arrays, whatever devices or processes saved it.

    Without a target orbax restores onto the saving job's shardings, which fails on any other topology
    (a checkpoint of a 2-process or TPU-pod job read on a laptop).
    """
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        tree_metadata = checkpointer.metadata(directory).item_metadata
        target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree_metadata)
        return checkpointer.restore(directory, args=ocp.args.StandardRestore(target))


def load_variables(path: str) -> tuple[dict, dict]:
    """Inference variables and metadata from a workdir or a checkpoint step folder.

    Args:
      path: a weights file (`.msgpack`, as shipped), a workdir (its best checkpoint, else its latest
        training state), a `best/` or `checkpoints/` folder (its newest step), or a step folder that holds
        `variables/` (a best checkpoint) or `state/`.

    Returns:
      (variables with `params` and `batch_stats` as numpy arrays, meta dict).
    """
    root = epath.Path(os.path.abspath(path))
    if not root.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if root.is_file():
        return _load_weights_file(path)
    for manager_dir in (root / BEST_DIR, root / LATEST_DIR, root):
        steps = ocp.utils.checkpoint_steps(manager_dir) if manager_dir.is_dir() else []
        if steps:
            return load_variables(os.fspath(manager_dir / str(max(steps))))
    for item in ("variables", "state"):
        if (root / item).is_dir():
            tree = _restore_arrays(root / item)
            meta = {}
            if (root / "meta").is_dir():
                meta = _restore_item(root / "meta", ocp.JsonCheckpointHandler(), ocp.args.JsonRestore())
                meta.pop(DIGEST_KEY, None)  # the digest of the whole training state, not of these variables
            # A training state with a moving average (`config.ema_decay`) is used through the average.
            source = tree.get("ema") or tree
            variables = {"params": source["params"], "batch_stats": source["batch_stats"]}
            return variables, meta
    raise FileNotFoundError(
        f"no checkpoint found in {path}: expected a workdir with {BEST_DIR}/ or {LATEST_DIR}/, "
        "or a step folder with variables/ or state/"
    )


def load_model(path: str, layer: str = "auto") -> tuple[models.FastSCNN, dict, dict]:
    """The network a weights file or workdir holds, ready for `model.apply(variables, images, train=False)`.

    Args:
      path: as for `load_variables`.
      layer: `config.cpu_layer`'s choice ('auto', 'on' or 'off', `steps.select_layer`) of the forms the
        model is built with; the variables are the same for every layer.

    Returns:
      (module built from `meta["model"]`, variables {'params', 'batch_stats'}, meta).

    Raises:
      ValueError: the metadata has no model settings (the network cannot be known), naming `path`.
    """
    variables, meta = load_variables(path)
    settings = meta.get("model")
    missing = [k for k in ("num_classes", "width") if not isinstance(settings, dict) or k not in settings]
    if missing:
        raise ValueError(
            f"{path} has no model settings in its metadata (meta['model'] lacks {', '.join(missing)}); "
            "cannot build the model it was trained as"
        )
    model = steps.model_from_signature(settings, steps.select_layer(layer))
    return model, {"params": variables["params"], "batch_stats": variables["batch_stats"]}, meta


def save_weights_file(path: str, variables: dict, meta: dict) -> None:
    """Writes inference variables and JSON metadata to one msgpack file (no pickle, no optimizer state)."""
    tree = {"variables": jax.tree.map(np.asarray, variables), "meta": json.dumps(meta)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(tree))


def _load_weights_file(path: str) -> tuple[dict, dict]:
    """Reads a file written by `save_weights_file`."""
    with open(path, "rb") as f:
        try:
            tree = serialization.msgpack_restore(f.read())
        except Exception as e:  # msgpack raises several unrelated types on corrupt input
            raise ValueError(f"{path} is not a fastscnn_jax weights file: {e}") from e
    if not isinstance(tree, dict) or "variables" not in tree:
        raise ValueError(f"{path} is not a fastscnn_jax weights file (no 'variables')")
    return tree["variables"], json.loads(tree.get("meta", "{}"))
