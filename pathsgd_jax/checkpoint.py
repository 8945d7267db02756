"""Saving and restoring params with a Path-SGD optimizer state, with errors that name leaves.

The optimizer state is a plain pytree, so any checkpointer can store it. These two functions
use Orbax (``pip install orbax-checkpoint``) and add the one thing a bare restore lacks: when
the checkpoint was written by another model or another optimizer configuration, the error
lists the leaves that differ and says what the difference usually means, before anything is
read.

Examples:
  >>> import os, tempfile, jax.numpy as jnp, pathsgd_jax as psgd
  >>> import pathsgd_jax.checkpoint as ckpt
  >>> net = lambda prm, x: jnp.maximum(x @ prm["w1"], 0.0) @ prm["w2"]
  >>> params = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}
  >>> tx = psgd.path_sgd(0.1, net, jnp.ones((1, 3)), momentum=0.9, refresh_every=5)
  >>> opt_state = tx.init(params)
  >>> directory = os.path.join(tempfile.mkdtemp(), "step_100")
  >>> ckpt.save(directory, params, opt_state)
  >>> restored, restored_state = ckpt.restore(directory, params=params, tx=tx)
  >>> bool(jnp.array_equal(restored["w1"], params["w1"]))
  True
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import optax

__all__ = ["CheckpointMismatchError", "restore", "save"]

_MAX_LISTED = 8


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree does not match the model and optimizer it is restored into."""


def _orbax():
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError("pathsgd_jax.checkpoint needs Orbax: pip install orbax-checkpoint") from error
  return ocp


def save(directory: str | os.PathLike[str], params: Any, opt_state: Any) -> None:
  """Writes ``{"params": params, "opt_state": opt_state}`` to a new directory and waits for it.

  Args:
    directory: where to write; it must not exist yet (Orbax refuses to overwrite).
    params: the parameter tree.
    opt_state: the optimizer state (e.g. of :func:`pathsgd_jax.path_sgd`).
  """
  ocp = _orbax()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(directory), {"params": params, "opt_state": opt_state})
    checkpointer.wait_until_finished()


def _describe(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  return {jax.tree_util.keystr(path, simple=True, separator="."):
              (tuple(np.shape(leaf)), str(np.dtype(leaf.dtype)))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _hints(missing: list[str], extra: list[str], reshaped: list[str]) -> list[str]:
  hints = []
  if any(".kappa." in name for name in missing):
    hints.append("this optimizer caches κ (refresh_every > 1) but the checkpoint has no cache: "
                 "it was written with refresh_every=1")
  if any(".kappa." in name for name in extra):
    hints.append("the checkpoint holds a κ cache (refresh_every > 1) that this optimizer, "
                 "with refresh_every=1, does not keep")
  if any(".trace." in name for name in missing + extra):
    hints.append("momentum differs: one side has a momentum trace, the other none")
  if any(name.startswith("params.") for name in missing + extra + reshaped):
    hints.append("the parameter trees differ: the checkpoint comes from another model "
                 "(other layers or widths)")
  return hints


def _listing(title: str, names: list[str], detail=lambda name: "") -> list[str]:
  if not names:
    return []
  names = sorted(names, key=lambda name: (not name.startswith("params."), name))
  lines = [f"{title} ({len(names)}):"]
  lines += [f"  {name}{detail(name)}" for name in names[:_MAX_LISTED]]
  if len(names) > _MAX_LISTED:
    lines.append(f"  ... and {len(names) - _MAX_LISTED} more")
  return lines


def restore(directory: str | os.PathLike[str], *, params: Any,
            tx: optax.GradientTransformation) -> tuple[Any, Any]:
  """Restores ``(params, opt_state)`` saved by :func:`save` into this model and optimizer.

  The checkpoint's leaves are compared with ``params`` and ``tx.init(params)`` by name, shape
  and dtype first; any difference raises :class:`CheckpointMismatchError` listing the leaves
  (missing, unexpected, reshaped) and what the difference usually means. Restored arrays take
  the shardings of the given ``params`` and of the state ``tx.init`` makes for them.

  Args:
    directory: a directory written by :func:`save`.
    params: parameters of the model to restore into: arrays or ``jax.ShapeDtypeStruct`` leaves
      (their values are not used).
    tx: the optimizer the training continues with, configured as when the checkpoint was
      written.

  Returns:
    ``(params, opt_state)`` as saved.

  Raises:
    CheckpointMismatchError: the checkpoint was written for another model or optimizer
      configuration.
    FileNotFoundError: ``directory`` does not exist.
  """
  ocp = _orbax()
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No checkpoint directory at {directory}.")
  target = jax.eval_shape(lambda p: {"params": p, "opt_state": tx.init(p)}, params)
  with ocp.StandardCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(directory)
    stored = {leaf.name: (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
              for leaf in jax.tree.leaves(getattr(metadata, "item_metadata", metadata))}
    expected = _describe(target)
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    reshaped = sorted(name for name in set(stored) & set(expected)
                      if stored[name] != expected[name])
    if missing or extra or reshaped:
      lines = [f"The checkpoint at {directory} does not fit this model and optimizer."]
      lines += _listing("Leaves this model/optimizer needs that the checkpoint lacks", missing)
      lines += _listing("Leaves in the checkpoint that this model/optimizer does not have",
                        extra)
      lines += _listing(
          "Leaves with another shape or dtype", reshaped,
          lambda name: (f": checkpoint {stored[name][0]} {stored[name][1]}, expected "
                        f"{expected[name][0]} {expected[name][1]}"))
      lines += [f"Likely: {hint}." for hint in _hints(missing, extra, reshaped)]
      raise CheckpointMismatchError("\n".join(lines))
    restored = checkpointer.restore(directory, target)
  return restored["params"], restored["opt_state"]
