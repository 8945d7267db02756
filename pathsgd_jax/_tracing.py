"""Tracing ``apply_fn`` for the path network: the single example, masks, the stand-in mesh."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from pathsgd_jax._errors import PathNetworkError


def _leaf_name(path) -> str:
  # NNX variables flatten to a trailing `.value`; it names no part of the model.
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"



def _single_example(x):
  shape = np.shape(x)
  if not shape:
    raise PathNetworkError(
        "example_input must be a batch with a leading batch axis (got a scalar). Pass e.g. "
        "x_train[:1] or jnp.zeros((1, *input_shape)).")
  return jax.ShapeDtypeStruct((1, *shape[1:]), jnp.result_type(x))


_STAND_IN_AXIS = "_path_network"


def _stand_in_mesh():
  """The context mesh with every axis of size 1 (plus one axis holding its devices), or None.

  A network that reshards its activations to a batch layout, as Explicit-mode sharding is
  written, cannot be traced on the path network's one example over the real mesh (a batch
  of 1 does not split); over this mesh it can, and those reshards are then dropped (see
  `_on_stand_in_mesh`).
  """
  get_mesh = getattr(jax.sharding, "get_abstract_mesh", None)  # JAX without explicit sharding
  mesh = get_mesh() if get_mesh is not None else None
  if mesh is None or mesh.empty:
    return None
  return jax.sharding.AbstractMesh(
      (1,) * len(mesh.axis_names) + (math.prod(mesh.axis_sizes),),
      tuple(mesh.axis_names) + (_STAND_IN_AXIS,),
      axis_types=tuple(mesh.axis_types) + (jax.sharding.AxisType.Explicit,))


def _on_stand_in_mesh(sharding) -> bool:
  return _STAND_IN_AXIS in getattr(getattr(sharding, "mesh", None), "axis_names", ())


_SHOWN_LEAVES = 6


def _trace(apply_fn, treedef, abstract_params, input_struct, leaf_names):
  params = jax.tree_util.tree_unflatten(treedef, abstract_params)
  try:
    return jax.make_jaxpr(apply_fn)(params, input_struct)
  except PathNetworkError:
    raise
  except Exception as error:  # pylint: disable=broad-except
    failure = error
  stand_in = _stand_in_mesh()
  if stand_in is not None:
    try:
      with jax.sharding.use_abstract_mesh(stand_in):
        return jax.make_jaxpr(apply_fn)(params, input_struct)
    except PathNetworkError:
      raise
    except Exception:  # pylint: disable=broad-except
      pass  # not a batch layout problem: report the first failure
  # The user's code failed: say where it was called from.
  shown = [f"{n}: {tuple(a.shape)} {a.dtype}" for n, a in zip(leaf_names, abstract_params)]
  summary = ", ".join(shown[:_SHOWN_LEAVES]) + (
      f", ... ({len(shown) - _SHOWN_LEAVES} more)" if len(shown) > _SHOWN_LEAVES else "")
  cause = str(failure).split("\n")[0]
  if len(cause) > 500:
    cause = cause[:500] + " ..."
  raise PathNetworkError(
      f"apply_fn(params, x) failed: {type(failure).__name__}: {cause}\nIt was traced with the "
      f"optimizer's params and a single example of shape "
      f"{jax.tree.map(lambda s: tuple(s.shape), input_struct)}. Check that apply_fn takes "
      "exactly the tree the optimizer is given (for Flax, use pathsgd_jax.linen.apply_fn / "
      "pathsgd_jax.nnx.apply_fn / pathsgd_jax.equinox.apply_fn) and that example_input has "
      f"the real input shape with a leading batch axis.\nParams seen ({len(shown)} leaves): "
      f"{summary}.") from failure


def _check_no_masked_nodes(params):
  import optax  # local: optax is a dependency, but keep this module importable standalone

  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  if any(isinstance(leaf, optax.MaskedNode) for leaf in leaves):
    raise PathNetworkError(
        "The params contain optax.MaskedNode leaves: this Path-SGD transformation is running "
        "inside optax.masked or optax.partition, which hides part of the network from it. "
        "Path scales depend on every weight of the network (each κ is a sum over whole paths), "
        "so Path-SGD must see the full parameter tree. Put scale_by_path_norm/path_sgd outside "
        "the mask and use its own `mask=` argument to exclude leaves that are not path weights.")


def _resolve_mask(mask, params, treedef) -> list[bool]:
  if mask is None:
    return [True] * treedef.num_leaves
  tree = mask(params) if callable(mask) else mask
  try:
    flags = treedef.flatten_up_to(tree)
  except (ValueError, TypeError) as error:
    raise PathNetworkError(
        f"mask must be a tree of booleans with the structure of params ({treedef}); "
        f"got {jax.tree.structure(tree)}.") from error
  return [bool(f) for f in flags]
