"""Orbax checkpointing: the latest training states for resume, and the best weights by val mIoU.

Two managers under separate policies, because `best_fn` with `max_to_keep` in one manager keeps the N best
and deletes the latest, which breaks resume:
  `WORKDIR/checkpoints/<step>/{state,meta}`: full TrainState (optimizer included), the last `max_to_keep`.
  `WORKDIR/best/<step>/{variables,meta}`: params and batch_stats only, of the best evaluation so far.
`meta` is JSON (step, scores, model settings); nothing is pickled.
Released weights (`fastscnn_jax/weights/*.msgpack`) are one msgpack file of params, batch_stats and meta.
"""

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
# The CamVid weights shipped with the package (see MODEL_CARD.md).
DEFAULT_WEIGHTS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "weights", "fastscnn_camvid.msgpack"
)


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
        root = epath.Path(os.path.abspath(workdir))
        self.latest = _manager(root / LATEST_DIR, ("state", "meta"), max_to_keep)
        self.best = _manager(root / BEST_DIR, ("variables", "meta"), 1)

    def latest_step(self) -> int | None:
        """Step of the newest training state, or None."""
        return self.latest.latest_step()

    def restore_state(self, abstract_state: Any) -> tuple[Any, dict]:
        """Restores the newest training state onto the shapes/shardings of `abstract_state`."""
        step = self.latest.latest_step()
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.meta

    def latest_meta(self) -> dict | None:
        """JSON metadata of the newest training state, or None."""
        step = self.latest.latest_step()
        if step is None:
            return None
        return self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def save_state(self, step: int, state: Any, meta: dict) -> None:
        """Saves the full training state."""
        self.latest.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def save_best(self, step: int, variables: Any, meta: dict) -> None:
        """Saves inference variables as the new best (the previous best is deleted)."""
        self.best.save(
            step,
            args=ocp.args.Composite(variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def close(self) -> None:
        """Waits for pending work and releases the managers."""
        self.latest.close()
        self.best.close()


def _restore_item(directory: epath.Path, handler, args) -> Any:
    """Restores one checkpoint item folder."""
    with ocp.Checkpointer(handler) as checkpointer:
        return checkpointer.restore(directory, args=args)


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
            tree = _restore_item(root / item, ocp.StandardCheckpointHandler(), ocp.args.StandardRestore())
            meta = {}
            if (root / "meta").is_dir():
                meta = _restore_item(root / "meta", ocp.JsonCheckpointHandler(), ocp.args.JsonRestore())
            variables = {"params": tree["params"], "batch_stats": tree["batch_stats"]}
            return variables, meta
    raise FileNotFoundError(
        f"no checkpoint found in {path}: expected a workdir with {BEST_DIR}/ or {LATEST_DIR}/, "
        "or a step folder with variables/ or state/"
    )


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
