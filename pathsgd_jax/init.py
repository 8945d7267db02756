"""Balanced and unbalanced initialisations of ReLU MLPs, as in the Path-SGD experiments.

A *balanced* network draws every kernel entry from ``N(0, 1/fan_in)`` and sets biases to
zero. An *unbalanced* network is a balanced one to which random node rescalings have been
applied: the function it computes is the same, but the weights are badly scaled across
units, which is what makes plain SGD slow and leaves Path-SGD (rescaling invariant)
unaffected.

The functions accept any parameter tree of a dense ReLU network: Flax Linen variables
(``{'params': {'Dense_0': {'kernel', 'bias'}, ...}}``), a Flax NNX state
(``nnx.state(model, nnx.Param)``), plain lists of ``(W, b)`` tuples or of ``{'w', 'b'}``
dicts. Kernels are ``(fan_in, fan_out)``, i.e. a layer computes ``x @ W + b``. The layer
sequence is discovered by :func:`dense_layers` or given explicitly as ``layers=``. The
returned tree has the structure, container types and dtypes of the input tree.

References:
  B. Neyshabur, R. Salakhutdinov, N. Srebro. Path-SGD: Path-Normalized Optimization in Deep
  Neural Networks. NIPS 2015, arXiv:1506.02617 (Section 5, balanced and unbalanced
  initialisations).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DenseLayer",
    "KeyPath",
    "LayerDiscoveryError",
    "balanced_init",
    "dense_layers",
    "hidden_sizes",
    "rescale_units",
    "sample_unbalanced_scales",
    "unbalanced_init",
]

#: A path of keys into a parameter tree, e.g. ``('params', 'Dense_0', 'kernel')`` or
#: ``('layers', 0, 'kernel')``. Wherever a path is accepted, the string
#: ``"params/Dense_0/kernel"`` may be used instead.
KeyPath = tuple[str | int, ...]

_KERNEL_NAMES = ("kernel", "w", "W", "weight", "weights")
_BIAS_NAMES = ("bias", "b", "B")
# Trailing attribute keys of variable wrappers (flax.nnx.Variable) that are not part of
# the user-facing path.
_WRAPPER_ATTRS = ("value", "raw_value")
_MAX_REORDER_LAYERS = 10


class LayerDiscoveryError(ValueError):
  """The dense layers of a parameter tree could not be identified unambiguously."""


class DenseLayer(NamedTuple):
  """Where one dense layer's parameters live in a parameter tree.

  Attributes:
    kernel: Path of the ``(fan_in, fan_out)`` kernel.
    bias: Path of the ``(fan_out,)`` bias, or ``None`` for a layer without bias.
  """

  kernel: KeyPath
  bias: KeyPath | None


@dataclasses.dataclass(frozen=True)
class _Leaf:
  index: int
  shape: tuple[int, ...]
  in_sequence: bool  # The last key indexes a list or tuple.


class _Tree:
  """A flattened parameter tree addressable by user-facing key paths."""

  def __init__(self, params: Any):
    flat, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    self.leaves = [leaf for _, leaf in flat]
    self.entries: dict[KeyPath, _Leaf] = {}
    self.by_text: dict[tuple[str, ...], KeyPath] = {}
    for i, (jax_path, leaf) in enumerate(flat):
      path, in_sequence = _user_path(jax_path)
      self.entries[path] = _Leaf(i, tuple(np.shape(leaf)), in_sequence)
      self.by_text[tuple(str(k) for k in path)] = path

  def shape(self, path: KeyPath) -> tuple[int, ...]:
    return self.entries[path].shape

  def get(self, path: KeyPath) -> Any:
    return self.leaves[self.entries[path].index]

  def lookup(self, path: Any) -> KeyPath | None:
    """Resolves a user-given path (tuple or '/'-string) to a stored path, or None."""
    if isinstance(path, str):
      text = tuple(path.strip("/").split("/"))
    elif isinstance(path, (tuple, list)) and all(isinstance(k, (str, int)) for k in path):
      text = tuple(str(k) for k in path)
    else:
      return None
    return self.by_text.get(text)

  def rebuild(self, updates: dict[KeyPath, Any]) -> Any:
    leaves = list(self.leaves)
    for path, value in updates.items():
      leaves[self.entries[path].index] = value
    return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _user_path(jax_path: Sequence[Any]) -> tuple[KeyPath, bool]:
  keys = list(jax_path)
  while (len(keys) > 1 and isinstance(keys[-1], jax.tree_util.GetAttrKey)
         and keys[-1].name in _WRAPPER_ATTRS):
    keys.pop()
  out: list[str | int] = []
  for k in keys:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(k.key if isinstance(k.key, (str, int)) else str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      out.append(k.key)
    else:  # pragma: no cover - future key types
      out.append(str(k))
  in_sequence = bool(keys) and isinstance(keys[-1], jax.tree_util.SequenceKey)
  return tuple(out), in_sequence


def _natural_key(path: KeyPath) -> tuple[tuple[tuple[int, int, str], ...], ...]:
  """Sort key comparing digit runs numerically, so ``Dense_10`` follows ``Dense_2``."""
  key = []
  for k in path:
    if isinstance(k, int):
      key.append(((0, k, ""),))
    else:
      key.append(tuple((0, int(chunk), "") if chunk.isdigit() else (1, 0, chunk)
                       for chunk in re.split(r"(\d+)", k) if chunk))
  return tuple(key)


def _format_path(path: KeyPath | None) -> str:
  return "None" if path is None else "/".join(str(k) for k in path)


def _find_bias(tree: _Tree, kernel: KeyPath) -> KeyPath | None:
  fan_out = tree.shape(kernel)[1]
  parent, last = kernel[:-1], kernel[-1]
  if tree.entries[kernel].in_sequence:
    candidates = [parent + (last + 1,)] if isinstance(last, int) else []
  else:
    candidates = [parent + (name,) for name in _BIAS_NAMES]
  for path in candidates:
    if path in tree.entries and tree.shape(path) == (fan_out,):
      return path
  return None


def _is_chain(tree: _Tree, layers: Sequence[DenseLayer]) -> bool:
  return all(tree.shape(a.kernel)[1] == tree.shape(b.kernel)[0]
             for a, b in zip(layers[:-1], layers[1:]))


def _describe(tree: _Tree, layers: Sequence[DenseLayer]) -> str:
  return "\n".join(f"  {_format_path(l.kernel)}: {tree.shape(l.kernel)}" for l in layers)


def _shape_chains(tree: _Tree, layers: list[DenseLayer], limit: int = 2
                  ) -> list[list[DenseLayer]]:
  """All orderings (up to ``limit``) in which consecutive kernel shapes connect."""
  found: list[list[DenseLayer]] = []

  def extend(chain: list[DenseLayer], rest: list[DenseLayer]) -> None:
    if len(found) >= limit:
      return
    if not rest:
      found.append(chain)
      return
    for i, layer in enumerate(rest):
      if not chain or tree.shape(chain[-1].kernel)[1] == tree.shape(layer.kernel)[0]:
        extend(chain + [layer], rest[:i] + rest[i + 1:])

  extend([], layers)
  return found


def _discover(tree: _Tree) -> list[DenseLayer]:
  layers = []
  for path, leaf in tree.entries.items():
    if len(leaf.shape) != 2:
      continue
    if leaf.in_sequence or (path and path[-1] in _KERNEL_NAMES):
      layers.append(DenseLayer(path, _find_bias(tree, path)))
  if not layers:
    raise LayerDiscoveryError(
        "No dense kernel found in the parameter tree: expected 2-D leaves named "
        f"{'/'.join(_KERNEL_NAMES)} (with an optional 1-D {'/'.join(_BIAS_NAMES)} beside "
        "them) or (W, b) pairs in a list. Pass layers=[kernel_path, ...] explicitly; the "
        f"tree's leaves are: {', '.join(_format_path(p) for p in list(tree.entries)[:20])}.")
  layers.sort(key=lambda l: _natural_key(l.kernel))
  if _is_chain(tree, layers):
    return layers
  chains = _shape_chains(tree, layers) if len(layers) <= _MAX_REORDER_LAYERS else []
  if len(chains) == 1:
    return chains[0]
  reason = ("several orders connect them" if chains else
            "no order connects them (the fan-out of each layer must equal the fan-in of "
            "the next)")
  raise LayerDiscoveryError(
      "Cannot determine the order of the dense layers: in natural name order the kernel "
      f"shapes do not connect, and {reason}. Kernels found (natural order):\n"
      f"{_describe(tree, layers)}\nPass layers=[kernel_path, ...] (first layer first) to "
      "say which kernels form the MLP and in which order.")


def _resolve_explicit(tree: _Tree, layers: Sequence[Any]) -> list[DenseLayer]:
  def must(path: Any, what: str) -> KeyPath:
    resolved = tree.lookup(path)
    if resolved is None:
      raise LayerDiscoveryError(
          f"{what} {path!r} given in layers= is not a leaf of the parameter tree; leaves "
          f"are: {', '.join(_format_path(p) for p in list(tree.entries)[:20])}.")
    return resolved

  out = []
  for item in layers:
    if isinstance(item, DenseLayer):
      kernel = must(item.kernel, "Kernel path")
      bias = None if item.bias is None else must(item.bias, "Bias path")
    elif tree.lookup(item) is not None:
      kernel = tree.lookup(item)
      bias = _find_bias(tree, kernel) if len(tree.shape(kernel)) == 2 else None
    elif isinstance(item, (tuple, list)) and len(item) == 2:
      kernel = must(item[0], "Kernel path")
      bias = None if item[1] is None else must(item[1], "Bias path")
    else:
      must(item, "Kernel path")
      raise AssertionError  # pragma: no cover - must() raised
    kshape = tree.shape(kernel)
    if len(kshape) != 2:
      raise LayerDiscoveryError(
          f"Kernel {_format_path(kernel)} has shape {kshape}; dense kernels must be 2-D "
          "(fan_in, fan_out).")
    if bias is not None and tree.shape(bias) != (kshape[1],):
      raise LayerDiscoveryError(
          f"Bias {_format_path(bias)} has shape {tree.shape(bias)} but kernel "
          f"{_format_path(kernel)} has fan-out {kshape[1]}; expected ({kshape[1]},).")
    out.append(DenseLayer(kernel, bias))
  if not out:
    raise LayerDiscoveryError("layers= is empty; list the kernel paths of at least one layer.")
  if not _is_chain(tree, out):
    raise LayerDiscoveryError(
        "The layers given in layers= do not form a chain: the fan-out of each kernel must "
        f"equal the fan-in of the next. Shapes in the given order:\n{_describe(tree, out)}")
  return out


def _layers(tree: _Tree, layers: Sequence[Any] | None) -> list[DenseLayer]:
  return _discover(tree) if layers is None else _resolve_explicit(tree, layers)


def dense_layers(params: Any, layers: Sequence[Any] | None = None) -> list[DenseLayer]:
  """Finds the dense layers of an MLP parameter tree, input layer first.

  Discovery takes every 2-D leaf whose key is one of ``kernel``, ``w``, ``W``, ``weight``,
  ``weights`` (bias: a 1-D sibling ``bias``/``b`` of size fan-out) and every 2-D element of
  a list or tuple (bias: the next element if it is 1-D of size fan-out), so Linen variables,
  NNX states, lists of ``(W, b)`` and lists of ``{'w', 'b'}`` all work. Layers are ordered by
  natural sort of their paths (``Dense_2`` before ``Dense_10``). If the kernel shapes do not
  connect in that order but connect in exactly one other order, that order is used.

  Args:
    params: The parameter tree (Linen variables, ``nnx.State``, lists, dicts, ...).
    layers: Optional explicit layer list, first layer first. Each item is a kernel path (a
      tuple of keys or a ``"a/b/kernel"`` string; its bias is found as above), a pair
      ``(kernel_path, bias_path_or_None)`` or a :class:`DenseLayer`.

  Returns:
    One :class:`DenseLayer` per layer, with paths as tuples of keys.

  Raises:
    LayerDiscoveryError: if no kernel is found, an explicit path does not exist, shapes are
      not 2-D kernels with matching biases, or the layer order is ambiguous or does not
      connect (fan-out of layer ``i`` must equal fan-in of layer ``i + 1``).
  """
  return _layers(_Tree(params), layers)


def hidden_sizes(params: Any, layers: Sequence[Any] | None = None) -> list[int]:
  """Number of hidden units after each layer but the last.

  Args:
    params: The parameter tree.
    layers: Optional explicit layers, as in :func:`dense_layers`.

  Returns:
    ``[fan_out(layer_0), ..., fan_out(layer_{L-2})]``.
  """
  tree = _Tree(params)
  return [tree.shape(l.kernel)[1] for l in _layers(tree, layers)[:-1]]


def _check_float(tree: _Tree, path: KeyPath) -> jnp.dtype:
  dtype = jnp.dtype(getattr(tree.get(path), "dtype", jnp.float32))
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"Parameter {_format_path(path)} has dtype {dtype}; initialisation needs floating "
        "point parameters.")
  return dtype


def balanced_init(key: jax.Array, params: Any,
                  layers: Sequence[Any] | None = None) -> Any:
  """Draws a balanced initialisation: kernels ``N(0, 1/fan_in)``, biases zero.

  Only the shapes and dtypes of the dense layers' leaves are used (leaves may even be
  ``jax.ShapeDtypeStruct``); all other leaves are returned unchanged.

  Args:
    key: A JAX PRNG key.
    params: The parameter tree to take structure, shapes and dtypes from.
    layers: Optional explicit layers, as in :func:`dense_layers`.

  Returns:
    A tree of the same structure and container types with freshly drawn kernels and zero
    biases, in the original dtypes.

  Examples:
    >>> import jax, jax.numpy as jnp, pathsgd_jax as psgd
    >>> params = [{"w": jnp.ones((400, 300)), "b": jnp.ones(300)},
    ...           {"w": jnp.ones((300, 10)), "b": jnp.ones(10)}]
    >>> fresh = psgd.balanced_init(jax.random.key(0), params)
    >>> float(fresh[0]["b"].sum()), round(float(fresh[0]["w"].var() * 400), 1)  # var 1/fan_in
    (0.0, 1.0)

  References:
    Neyshabur, Salakhutdinov, Srebro. Path-SGD, NIPS 2015, Section 5.
  """
  tree = _Tree(params)
  found = _layers(tree, layers)
  updates: dict[KeyPath, Any] = {}
  for layer_key, layer in zip(jax.random.split(key, len(found)), found):
    fan_in, fan_out = tree.shape(layer.kernel)
    dtype = _check_float(tree, layer.kernel)
    w = jax.random.normal(layer_key, (fan_in, fan_out), dtype=jnp.float32)
    updates[layer.kernel] = (w / math.sqrt(fan_in)).astype(dtype)
    if layer.bias is not None:
      updates[layer.bias] = jnp.zeros((fan_out,), _check_float(tree, layer.bias))
  return tree.rebuild(updates)


def _is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def rescale_units(params: Any, scales: Sequence[jax.Array],
                  layers: Sequence[Any] | None = None) -> Any:
  """Applies node rescalings to every hidden unit of an MLP.

  For hidden layer ``i`` (the output of dense layer ``i``) and unit ``j`` with factor
  ``c = scales[i][j] > 0``: column ``j`` of kernel ``i`` and entry ``j`` of bias ``i`` are
  multiplied by ``c`` and row ``j`` of kernel ``i + 1`` is divided by ``c``. For a ReLU (or
  any positively homogeneous) activation the network function is unchanged.

  Args:
    params: The parameter tree.
    scales: One positive array of shape ``(h_i,)`` per hidden layer (``len(layers) - 1``
      arrays; see :func:`hidden_sizes`).
    layers: Optional explicit layers, as in :func:`dense_layers`.

  Returns:
    The rescaled tree, same structure, container types and dtypes.

  Raises:
    ValueError: if the number or shapes of ``scales`` do not match the hidden layers, or a
      (concrete) factor is not positive.
  """
  tree = _Tree(params)
  found = _layers(tree, layers)
  sizes = [tree.shape(l.kernel)[1] for l in found[:-1]]
  if len(scales) != len(sizes):
    raise ValueError(
        f"rescale_units got {len(scales)} scale arrays but the network has {len(sizes)} "
        f"hidden layers of sizes {sizes}; pass one array per hidden layer.")
  updates: dict[KeyPath, Any] = {}

  def current(path: KeyPath) -> jax.Array:
    return updates[path] if path in updates else jnp.asarray(tree.get(path))

  for i, (scale, size) in enumerate(zip(scales, sizes)):
    scale = jnp.asarray(scale)
    if scale.shape != (size,):
      raise ValueError(
          f"scales[{i}] has shape {scale.shape} but hidden layer {i} "
          f"({_format_path(found[i].kernel)}) has {size} units; expected ({size},).")
    if _is_concrete(scale) and not bool(jnp.all(scale > 0)):
      raise ValueError(
          f"scales[{i}] has non-positive entries; node rescalings need factors > 0 (a "
          "negative factor would change the function of a ReLU network).")
    into, out = found[i], found[i + 1]
    k_in = current(into.kernel)
    updates[into.kernel] = (k_in * scale.astype(k_in.dtype)[None, :]).astype(k_in.dtype)
    if into.bias is not None:
      b = current(into.bias)
      updates[into.bias] = (b * scale.astype(b.dtype)).astype(b.dtype)
    k_out = current(out.kernel)
    updates[out.kernel] = (k_out / scale.astype(k_out.dtype)[:, None]).astype(k_out.dtype)
  return tree.rebuild(updates)


def sample_unbalanced_scales(key: jax.Array, sizes: Sequence[int], *,
                             fraction: float = 0.25, factor: float = 10.0,
                             power_of_two: bool = False) -> list[jax.Array]:
  """Draws the per-unit factors of the paper's unbalanced initialisation.

  For each hidden layer of ``h`` units, ``round(fraction * h)`` units are drawn uniformly
  *with replacement*; each draw multiplies that unit's factor by ``factor * exp(z)``,
  ``z ~ N(0, 1)``. Units never drawn keep factor 1; a unit drawn twice gets the product.

  With ``power_of_two=True`` each unit's total factor ``c`` is rounded to ``2^round(log2 c)``
  (within a factor √2 of the drawn one). Multiplying by a power of two is exact in floating
  point, so the rescaled network then computes the *same* function bit for bit, and a
  rescaling-invariant optimizer follows the same trajectory to the last bit; with the paper's
  continuous factors the two starts differ by rounding, which training amplifies (by a few
  percent of the loss within a few thousand float32 steps at large learning rates).

  Args:
    key: A JAX PRNG key.
    sizes: Number of units of each hidden layer (see :func:`hidden_sizes`).
    fraction: Draws per unit (``1/4`` in the paper).
    factor: Scale of each draw (``10`` in the paper).
    power_of_two: Round each unit's factor to the nearest power of two (in log scale).

  Returns:
    One ``float32`` array of positive factors of shape ``(h_i,)`` per hidden layer.

  Raises:
    ValueError: if ``fraction`` is negative or ``factor`` not positive.
  """
  if not fraction >= 0:
    raise ValueError(f"fraction must be >= 0 (draws per hidden unit), got {fraction}.")
  if not factor > 0:
    raise ValueError(f"factor must be > 0 for a valid node rescaling, got {factor}.")
  out = []
  for layer_key, size in zip(jax.random.split(key, max(len(sizes), 1)), sizes):
    k_idx, k_z = jax.random.split(layer_key)
    draws = int(round(fraction * size))
    idx = jax.random.randint(k_idx, (draws,), 0, size)
    log_c = math.log(factor) + jax.random.normal(k_z, (draws,), dtype=jnp.float32)
    log_total = jnp.zeros((size,), jnp.float32).at[idx].add(log_c)
    if power_of_two:
      exponent = jnp.round(log_total / math.log(2.0)).astype(jnp.int32)
      out.append(jnp.ldexp(jnp.ones((size,), jnp.float32), exponent))  # exp2 is not exact
    else:
      out.append(jnp.exp(log_total))
  return out


def unbalanced_init(key: jax.Array, params: Any, layers: Sequence[Any] | None = None, *,
                    fraction: float = 0.25, factor: float = 10.0,
                    power_of_two: bool = False) -> Any:
  """Unbalances a network by random node rescalings, keeping its function.

  Equivalent to ``rescale_units(params, sample_unbalanced_scales(key, hidden_sizes(params),
  fraction=fraction, factor=factor))``: ``h/4`` hidden units per layer are drawn with
  replacement, and each draw multiplies the unit's incoming weights and bias by
  ``10 * exp(z)`` and divides its outgoing weights by the same factor. Start from a balanced
  network (:func:`balanced_init`) to reproduce the paper.

  Args:
    key: A JAX PRNG key.
    params: The (usually balanced) parameter tree to rescale.
    layers: Optional explicit layers, as in :func:`dense_layers`.
    fraction: Draws per hidden unit (``0.25`` in the paper).
    factor: Scale of each draw (``10`` in the paper).
    power_of_two: Round each unit's factor to a power of two, so the rescaled network is
      the same function exactly, not only up to rounding (see
      :func:`sample_unbalanced_scales`).

  Returns:
    The rescaled tree, same structure, container types and dtypes.

  Examples:
    >>> import jax, jax.numpy as jnp, pathsgd_jax as psgd
    >>> params = psgd.balanced_init(jax.random.key(0), [
    ...     {"w": jnp.zeros((20, 16)), "b": jnp.zeros(16)},
    ...     {"w": jnp.zeros((16, 3)), "b": jnp.zeros(3)}])
    >>> net = lambda prm, x: jax.nn.relu(x @ prm[0]["w"] + prm[0]["b"]) @ prm[1]["w"] + prm[1]["b"]
    >>> skewed = psgd.unbalanced_init(jax.random.key(1), params, power_of_two=True)
    >>> x = jax.random.normal(jax.random.key(2), (5, 20))
    >>> bool(jnp.array_equal(net(params, x), net(skewed, x)))  # the same function, exactly
    True
    >>> bool(jnp.array_equal(params[0]["w"], skewed[0]["w"]))  # other weights
    False

  References:
    Neyshabur, Salakhutdinov, Srebro. Path-SGD, NIPS 2015, Section 5.
  """
  tree = _Tree(params)
  found = _layers(tree, layers)
  sizes = [tree.shape(l.kernel)[1] for l in found[:-1]]
  scales = sample_unbalanced_scales(key, sizes, fraction=fraction, factor=factor,
                                    power_of_two=power_of_two)
  return rescale_units(params, scales, list(found))
