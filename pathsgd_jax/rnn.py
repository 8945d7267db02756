r"""ReLU recurrent networks for Path-SGD: the Elman RNN, its initialisations, κ^(1) and κ^(2).

The network (one hidden layer of ``n`` ReLU units, inputs ``x_1..x_T`` of dimension ``d``):

.. math::
   h_0 = 0, \qquad h_t = \mathrm{relu}(x_t W_{in} + h_{t-1} W_{rec} + b), \qquad
   y_t = h_t W_{out} + b_{out},

read at the last step (``outputs="last"``, the adding problem), at every step
(``outputs="all"``) or at chosen steps. Parameters are a dict ``{"W_in": (d, n),
"W_rec": (n, n), "b": (n,), "W_out": (n, k), "b_out": (k,)}``; :func:`rnn_apply` is a plain
``jax.lax.scan``, so it goes to :func:`pathsgd_jax.path_sgd` as any other ``apply_fn``.

**Path network of an RNN.** Unrolled over the ``T`` steps of the training sequences the RNN is
a feed-forward DAG whose edges *share* parameters: the entry ``W_rec[i, j]`` is the edge
``h_{t-1}[i] → h_t[j]`` of every step ``t``. Paths start at an input ``x_t[k]`` or at a bias
(``b`` at any step, ``b_out`` at a read step) and end at an output that enters the loss (the
read steps are the sinks). For a parameter ``w_i`` and ``p = 2`` (Neyshabur, Wu,
Salakhutdinov & Srebro, NIPS 2016), the Path-SGD preconditioner is ``κ_i = κ^(1)_i +
κ^(2)_i``:

.. math::
   κ^{(1)}_i = \sum_{e:\,π(e)=i}\ \sum_{\text{paths } P \ni e}\ \prod_{e' \in P,\, e' \ne e}
   w_{π(e')}^2, \qquad
   κ^{(2)}_i = w_i^2 \sum_{\substack{(e_1, e_2):\, e_1 \ne e_2\\ π(e_1)=π(e_2)=i}}\
   \sum_{\text{paths } P \ni e_1, e_2}\ \prod_{e' \in P \setminus \{e_1, e_2\}} w_{π(e')}^2,

where ``π(e)`` is the parameter of edge ``e`` and the pairs ``(e_1, e_2)`` are *ordered*. On a
path that holds ``m`` copies of ``w_i`` and otherwise the product ``R`` of squared weights,
κ^(1) collects ``m·w_i^{2m-2}R`` and κ^(2) ``m(m-1)·w_i^{2m-2}R``: together ``m²·w_i^{2m-2}R
= (∂(w_i^m)/∂w_i)^2 R``, i.e. ``κ_i = Σ_paths (∂ Π_{e∈P} w_{π(e)} / ∂w_i)^2``, the diagonal of
the path regulariser's second-order term (its Gauss-Newton form). With ``v = w^2`` and the
path sum ``g(v) = Σ_P Π_{e∈P} v_{π(e)}`` (a polynomial in the tied ``v``):

.. math::
   κ^{(1)} = ∂g/∂v, \qquad κ^{(2)} = v \odot \operatorname{diag}(∂^2 g/∂v^2).

κ^(1) is what :func:`pathsgd_jax.path_scales` returns for an RNN (autodiff through the path
network sums over the occurrences of each shared weight), and what :func:`pathsgd_jax.path_sgd`
divides by; the paper drops κ^(2) as empirically small (measured with
:mod:`pathsgd_jax.experiments.rnn` on the adding problem, T = 100: Σκ^(2)/Σκ^(1) over
``W_rec`` is about 0.01 from a scaled Gaussian start and along training, but 0.63 at an
identity recurrent matrix (IRNN), whose diagonal entries reach κ^(2)/κ^(1) ≈ 65: a path
that uses an entry ``m`` times adds ``m(m-1)`` to its κ^(2) against ``m`` to its κ^(1)).
In this Elman RNN only ``W_rec`` can
occur twice on a path (a path starts at one source, leaves through one output, and uses one
recurrent edge per step), so κ^(2) is zero for every other leaf.

:func:`kappa_terms` computes κ^(1) and κ^(2) in ``O(T n^3)`` with the recurrences of the
unrolled path network (cheap enough to call during training); :func:`kappa_terms_bruteforce`
enumerates every path of the unrolled DAG in float64 (tiny RNNs only) as the exact reference;
:func:`kappa_ratio` summarises κ^(2)/κ^(1).

References:
  B. Neyshabur, Y. Wu, R. Salakhutdinov, N. Srebro. Path-Normalized Optimization of Recurrent
  Neural Networks with ReLU Activations. NIPS 2016, arXiv:1605.07154.
  Q. V. Le, N. Jaitly, G. E. Hinton. A Simple Way to Initialize Recurrent Networks of
  Rectified Linear Units. arXiv:1504.00941, 2015 (the IRNN initialisation).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "PARAM_NAMES",
    "RECURRENT_INITS",
    "init_rnn",
    "rnn_apply",
    "read_steps",
    "kappa_terms",
    "kappa_terms_bruteforce",
    "kappa_ratio",
    "rescale_hidden_units",
]

#: The leaves of an Elman RNN's parameter dict, in order.
PARAM_NAMES = ("W_in", "W_rec", "b", "W_out", "b_out")

#: Recurrent-matrix initialisations accepted by :func:`init_rnn`.
RECURRENT_INITS = ("identity", "gaussian", "orthogonal")


def init_rnn(key: jax.Array, input_dim: int, hidden: int, output_dim: int = 1, *,
             recurrent: str = "identity", recurrent_scale: float = 1.0,
             input_std: float | None = None, output_std: float | None = None,
             dtype=jnp.float32) -> dict[str, jax.Array]:
  r"""Parameters of an Elman ReLU RNN.

  * ``W_rec``: ``recurrent="identity"``: ``recurrent_scale · I`` (the IRNN of Le et al.,
    2015, with scale 1); ``"gaussian"``: entries ``N(0, recurrent_scale² / hidden)`` (spectral
    radius ≈ ``recurrent_scale``); ``"orthogonal"``: a random orthogonal matrix times
    ``recurrent_scale``.
  * ``W_in ~ N(0, input_std²)`` (default ``input_std = 1/sqrt(input_dim)``; IRNN used 0.001),
    ``W_out ~ N(0, output_std²)`` (default ``1/sqrt(hidden)``); biases zero.

  Args:
    key: a JAX PRNG key.
    input_dim: ``d``, features per time step.
    hidden: ``n``, hidden units.
    output_dim: ``k``, outputs per read step.
    recurrent: one of :data:`RECURRENT_INITS`.
    recurrent_scale: scale of ``W_rec`` (see above).
    input_std: standard deviation of ``W_in``.
    output_std: standard deviation of ``W_out``.
    dtype: parameter dtype.

  Returns:
    ``{"W_in", "W_rec", "b", "W_out", "b_out"}``.

  Examples:
    >>> import jax
    >>> from pathsgd_jax import rnn
    >>> params = rnn.init_rnn(jax.random.key(0), 2, 4)
    >>> {k: v.shape for k, v in params.items()}
    {'W_in': (2, 4), 'W_rec': (4, 4), 'b': (4,), 'W_out': (4, 1), 'b_out': (1,)}
    >>> params["W_rec"][0]
    Array([1., 0., 0., 0.], dtype=float32)
  """
  if recurrent not in RECURRENT_INITS:
    raise ValueError(f"recurrent must be one of {RECURRENT_INITS}, got {recurrent!r}.")
  k_in, k_rec, k_out = jax.random.split(key, 3)
  input_std = 1.0 / np.sqrt(input_dim) if input_std is None else float(input_std)
  output_std = 1.0 / np.sqrt(hidden) if output_std is None else float(output_std)
  if recurrent == "identity":
    w_rec = recurrent_scale * jnp.eye(hidden, dtype=dtype)
  elif recurrent == "gaussian":
    w_rec = (recurrent_scale / np.sqrt(hidden)) * jax.random.normal(k_rec, (hidden, hidden),
                                                                    dtype)
  else:
    w_rec = recurrent_scale * jax.nn.initializers.orthogonal()(k_rec, (hidden, hidden), dtype)
  return {
      "W_in": input_std * jax.random.normal(k_in, (input_dim, hidden), dtype),
      "W_rec": w_rec.astype(dtype),
      "b": jnp.zeros((hidden,), dtype),
      "W_out": output_std * jax.random.normal(k_out, (hidden, output_dim), dtype),
      "b_out": jnp.zeros((output_dim,), dtype),
  }


def read_steps(outputs: Any, seq_len: int) -> np.ndarray:
  """The 0-based time steps whose outputs are read (the path network's sinks).

  ``outputs`` is ``"last"``, ``"all"``, a boolean mask of length ``seq_len`` or a sequence of
  step indices (negative indices count from the end).

  Examples:
    >>> from pathsgd_jax.rnn import read_steps
    >>> read_steps("last", 4), read_steps("all", 3), read_steps([True, False, True], 3)
    (array([3]), array([0, 1, 2]), array([0, 2]))
  """
  if isinstance(outputs, str):
    if outputs == "last":
      return np.array([seq_len - 1])
    if outputs == "all":
      return np.arange(seq_len)
    raise ValueError(f"outputs must be 'last', 'all', a boolean mask or step indices, got "
                     f"{outputs!r}.")
  arr = np.asarray(outputs)
  if arr.dtype == bool:
    if arr.shape != (seq_len,):
      raise ValueError(f"a boolean outputs mask must have shape ({seq_len},), got {arr.shape}.")
    steps = np.flatnonzero(arr)
  else:
    steps = np.asarray(arr, dtype=np.int64).reshape(-1)
    if np.any(steps >= seq_len) or np.any(steps < -seq_len):
      raise ValueError(f"output steps {steps.tolist()} out of range for {seq_len} steps.")
    steps = np.unique(np.where(steps < 0, steps + seq_len, steps))
  if steps.size == 0:
    raise ValueError("outputs selects no time step: the network would have no output.")
  return steps


def rnn_apply(params: dict[str, jax.Array], x: jax.Array, *, outputs: Any = "last",
              unroll: int = 1) -> jax.Array:
  r"""Runs the Elman ReLU RNN over a batch of sequences with :func:`jax.lax.scan`.

  .. math::
     h_t = \mathrm{relu}(x_t W_{in} + h_{t-1} W_{rec} + b), \quad h_0 = 0, \quad
     y_t = h_t W_{out} + b_{out}.

  Args:
    params: ``{"W_in", "W_rec", "b", "W_out", "b_out"}`` (see :func:`init_rnn`).
    x: inputs ``(batch, T, d)``.
    outputs: ``"last"`` returns ``y_T`` as ``(batch, k)``; ``"all"`` returns every ``y_t`` as
      ``(batch, T, k)``; a boolean mask or step indices return ``(batch, len(steps), k)``.
      Only the returned outputs are paths' sinks for Path-SGD: pass the same ``outputs`` the
      loss reads.
    unroll: forwarded to :func:`jax.lax.scan`.

  Returns:
    The outputs read.

  Examples:
    >>> import jax, jax.numpy as jnp, pathsgd_jax as psgd
    >>> from pathsgd_jax import rnn
    >>> params = rnn.init_rnn(jax.random.key(0), 2, 8)
    >>> x = jnp.ones((5, 10, 2))
    >>> rnn.rnn_apply(params, x).shape, rnn.rnn_apply(params, x, outputs="all").shape
    ((5, 1), (5, 10, 1))
    >>> tx = psgd.path_sgd(1e-3, rnn.rnn_apply, x)  # κ^(1) of the RNN unrolled 10 steps
  """
  x = jnp.asarray(x)
  if x.ndim != 3:
    raise ValueError(f"rnn_apply expects inputs (batch, T, d), got shape {x.shape}.")
  seq_len = x.shape[1]
  w_in, w_rec, b = params["W_in"], params["W_rec"], params["b"]
  h0 = jnp.zeros((x.shape[0], w_rec.shape[0]), jnp.result_type(x, w_rec))

  b_row = b[None, :]

  def step(h, x_t):
    h = jax.nn.relu(x_t @ w_in + h @ w_rec + b_row)
    return h, h

  xs = jnp.swapaxes(x, 0, 1)  # (T, batch, d)
  if isinstance(outputs, str) and outputs == "last":
    h_last, _ = lax.scan(step, h0, xs, unroll=unroll)
    return h_last @ params["W_out"] + params["b_out"][None, :]
  _, hs = lax.scan(step, h0, xs, unroll=unroll)  # (T, batch, n)
  hs = jnp.swapaxes(hs, 0, 1)  # (batch, T, n)
  if not (isinstance(outputs, str) and outputs == "all"):
    hs = hs[:, read_steps(outputs, seq_len)]
  return hs @ params["W_out"] + params["b_out"][None, None, :]


def rescale_hidden_units(params: dict[str, Any], factors: Any) -> dict[str, Any]:
  """The same function with hidden unit ``j`` rescaled by ``c_j > 0`` at every time step.

  Incoming input weights ``W_in[:, j]``, the incoming recurrent column ``W_rec[:, j]`` and
  ``b[j]`` are multiplied by ``c_j``; the outgoing recurrent row ``W_rec[j, :]`` and
  ``W_out[j, :]`` are divided by ``c_j`` (so ``W_rec[i, j] → W_rec[i, j] c_j / c_i``). ReLU
  is positively homogeneous, so the outputs are unchanged.

  Examples:
    >>> import jax, jax.numpy as jnp, pathsgd_jax as psgd
    >>> from pathsgd_jax import rnn
    >>> params = rnn.init_rnn(jax.random.key(0), 2, 3, recurrent="gaussian")
    >>> other = rnn.rescale_hidden_units(params, jnp.array([2.0, 0.5, 10.0]))
    >>> x = jax.random.uniform(jax.random.key(1), (4, 6, 2))
    >>> bool(jnp.allclose(rnn.rnn_apply(params, x), rnn.rnn_apply(other, x),
    ...                   rtol=1e-5, atol=1e-6))
    True
  """
  c = jnp.asarray(factors)
  out = dict(params)
  out["W_in"] = params["W_in"] * c[None, :]
  out["b"] = params["b"] * c
  out["W_rec"] = params["W_rec"] * c[None, :] / c[:, None]
  out["W_out"] = params["W_out"] / c[:, None]
  return out


# ------------------------------------------------------------------------------------------
# κ^(1) and κ^(2): efficient recurrences.
# ------------------------------------------------------------------------------------------


def _compute_dtype():
  return jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32


def _lse_add(acc, acc_e, term, term_e):
  """(acc·2^acc_e) + (term·2^term_e) as (value, exponent), without overflow."""
  new_e = jnp.maximum(acc_e, term_e)
  return acc * jnp.exp2(acc_e - new_e) + term * jnp.exp2(term_e - new_e), new_e


def _normalised(x, e):
  """x·2^e with x rescaled so that max |x| is 1 (x = 0 is left as is)."""
  m = jnp.max(x)
  safe = jnp.where(m > 0, m, 1.0)
  return x / safe, e + jnp.log2(safe)


def kappa_terms(params: dict[str, Any], seq_len: int, *, outputs: Any = "last",
                normalize: bool = False) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  r"""κ^(1) and κ^(2) (``p = 2``) of the Elman RNN unrolled over ``seq_len`` steps.

  The definitions are in the module docstring. With ``v = w²``, ``u = 1·V_in + β`` (the path
  network's input at every step, all-ones inputs), ``r = V_out 1`` and the read steps ``R``:

  * forward (paths from the sources into ``h_t``): ``a_0 = 0``, ``a_t = a_{t-1} V_rec + u``;
  * backward (paths from ``h_t`` to the sinks): ``c_t = V_rec c_{t+1} + [t ∈ R] r``;
  * ``κ^(1)(W_rec)[i, j] = Σ_t a_{t-1}[i] c_t[j]`` (the other leaves likewise);
  * ``κ^(2)(W_rec)[i, j] = 2 v_ij Σ_s a_{s-1}[i] C_s[j, i]`` with the matrix recurrence
    ``C_T = 0``, ``C_s = diag(c_{s+1}) + C_{s+1} V_rec``, i.e. ``C_s[j, i] = Σ_{t>s}
    c_t[j] (V_rec^{t-1-s})[j, i]``: the paths that use the edge ``i → j`` at step ``s`` and
    again at step ``t`` (the factor 2 counts both orders of the pair).

  ``O(T n³)`` time and ``O(n²)`` memory; every vector is renormalised as it goes and sums are
  kept as (value, base-2 exponent), so path sums that leave the float range on the way do not
  spoil κ/φ² (``normalize=True``). Raw κ (the default) is ``φ²·(κ/φ²)`` and may overflow to
  ``inf`` when φ² does.

  Args:
    params: ``{"W_in", "W_rec", "b", "W_out", "b_out"}``.
    seq_len: ``T``, the length of the training sequences.
    outputs: the read steps (see :func:`read_steps`), as in :func:`rnn_apply`.
    normalize: return κ/φ₂² (scale-free) instead of κ.

  Returns:
    ``(kappa1, kappa2)``, two dicts like ``params``.

  Examples:
    >>> import jax, jax.numpy as jnp, pathsgd_jax as psgd
    >>> from pathsgd_jax import rnn
    >>> params = rnn.init_rnn(jax.random.key(0), 2, 3, recurrent="gaussian")
    >>> k1, k2 = rnn.kappa_terms(params, 5)
    >>> ref = psgd.path_scales(rnn.rnn_apply, params, jnp.ones((1, 5, 2)))
    >>> bool(jnp.allclose(k1["W_rec"], ref["W_rec"], rtol=1e-4))
    True
    >>> float(jnp.abs(k2["W_in"]).max()), bool(k2["W_rec"].min() >= 0)
    (0.0, True)
  """
  dtype = _compute_dtype()
  v = {name: jnp.square(jnp.asarray(params[name]).astype(dtype)) for name in PARAM_NAMES}
  n = v["W_rec"].shape[0]
  steps = read_steps(outputs, seq_len)
  is_read = np.zeros(seq_len, bool)
  is_read[steps] = True
  u = jnp.sum(v["W_in"], axis=0) + v["b"]  # (n,): all-ones input.
  r = jnp.sum(v["W_out"], axis=1)  # (n,)
  vr = v["W_rec"]
  zero = jnp.zeros((), dtype)

  # Forward: a_t (t = 1..T) as (value, exponent); a_0 = 0.
  def fwd(carry, _):
    a, e = carry
    a_next, e_next = _lse_add(a @ vr, e, u, zero)
    a_next, e_next = _normalised(a_next, e_next)
    return (a_next, e_next), (a_next, e_next)

  (_, _), (a_seq, a_exp) = lax.scan(fwd, (jnp.zeros((n,), dtype), zero), None, length=seq_len)
  a_prev = jnp.concatenate([jnp.zeros((1, n), dtype), a_seq[:-1]])  # a_{t-1}, t = 1..T
  a_prev_exp = jnp.concatenate([jnp.zeros((1,), dtype), a_exp[:-1]])

  # Backward: c_t (t = T..1) with c_t = V c_{t+1} + [t in R] r.
  read = jnp.asarray(is_read)

  def bwd(carry, is_r):
    c, e = carry  # c_{t+1}
    c_new, e_new = _lse_add(vr @ c, e, jnp.where(is_r, r, 0.0), zero)
    c_new, e_new = _normalised(c_new, e_new)
    return (c_new, e_new), (c_new, e_new)

  (_, _), (c_rev, c_exp_rev) = lax.scan(bwd, (jnp.zeros((n,), dtype), zero), read,
                                        reverse=True)
  c_seq, c_exp = c_rev, c_exp_rev  # reverse=True keeps time order: index t-1 holds c_t.

  # Path sum g = Σ_{t∈R} (a_t · r + Σ β_out) = Σ_t (a_{t-1} V + u)·c_t contributions; use the
  # sinks directly.
  a_read = a_seq[steps]
  a_read_exp = a_exp[steps]
  sink_terms = a_read @ r  # (|R|,)
  bias_out = jnp.sum(v["b_out"])
  read_max = jnp.max(a_read_exp)
  g_val, g_exp = jnp.sum(sink_terms * jnp.exp2(a_read_exp - read_max)), read_max
  g_val, g_exp = _lse_add(g_val, g_exp, bias_out * len(steps), zero)
  log2_g = g_exp + jnp.log2(g_val)
  # Every κ below is returned as value · 2^(exponent - shift): shift = log2 g (normalised)
  # or 0 (raw κ, computed as κ/g·g so that the whole computation stays in range).

  def finish(val, e):
    rel = val * jnp.exp2(e - log2_g)  # κ/g
    return rel if normalize else rel * g_val * jnp.exp2(g_exp)

  # κ^(1): weighted sums over time of outer products, accumulated with exponents.
  def k1_scan(carry, inp):
    acc_rec, e_rec, acc_in, e_in = carry
    a_p, ea, c_t, ec = inp
    acc_rec, e_rec = _lse_add(acc_rec, e_rec, jnp.outer(a_p, c_t), ea + ec)
    acc_in, e_in = _lse_add(acc_in, e_in, c_t, ec)
    return (acc_rec, e_rec, acc_in, e_in), None

  neg_inf = jnp.asarray(-jnp.inf, dtype)
  init = (jnp.zeros((n, n), dtype), neg_inf, jnp.zeros((n,), dtype), neg_inf)
  (k_rec, e_rec, k_c, e_c), _ = lax.scan(k1_scan, init, (a_prev, a_prev_exp, c_seq, c_exp))
  e_rec = jnp.where(jnp.isfinite(e_rec), e_rec, 0.0)
  e_c = jnp.where(jnp.isfinite(e_c), e_c, 0.0)
  # κ^(1)(W_out)[j, m] = Σ_{t∈R} a_t[j]; κ^(1)(b_out) = |R|.
  k_out = jnp.sum(a_read * jnp.exp2(a_read_exp - read_max)[:, None], axis=0)
  e_out = read_max
  d = v["W_in"].shape[0]
  k_dim = v["W_out"].shape[1]
  kappa1 = {
      "W_in": finish(jnp.broadcast_to(k_c, (d, n)), e_c),
      "W_rec": finish(k_rec, e_rec),
      "b": finish(k_c, e_c),
      "W_out": finish(jnp.broadcast_to(k_out[:, None], (n, k_dim)), e_out),
      "b_out": finish(jnp.full((k_dim,), float(len(steps)), dtype), zero),
  }

  # κ^(2)(W_rec): backward matrix recurrence C_s = diag(c_{s+1}) + C_{s+1} V, accumulating
  # Σ_s a_{s-1}[i] C_s[j, i].
  def k2_scan(carry, inp):
    cm, e_cm, acc, e_acc = carry  # C_{s+1} (as value, exponent), accumulator
    a_p, ea, c_next, ec_next = inp  # a_{s-1}, c_{s+1}
    cm, e_cm = _lse_add(cm @ vr, e_cm, jnp.diag(c_next), ec_next)
    cm, e_cm = _normalised(cm, e_cm)
    acc, e_acc = _lse_add(acc, e_acc, a_p[:, None] * cm.T, ea + e_cm)
    return (cm, e_cm, acc, e_acc), None

  # Inputs for s = 1..T: a_{s-1} and c_{s+1} (c_{T+1} = 0).
  c_next = jnp.concatenate([c_seq[1:], jnp.zeros((1, n), dtype)])
  c_next_exp = jnp.concatenate([c_exp[1:], jnp.zeros((1,), dtype)])
  init2 = (jnp.zeros((n, n), dtype), zero, jnp.zeros((n, n), dtype), neg_inf)
  (_, _, k2, e2), _ = lax.scan(k2_scan, init2, (a_prev, a_prev_exp, c_next, c_next_exp),
                               reverse=True)
  e2 = jnp.where(jnp.isfinite(e2), e2, 0.0)
  kappa2 = {name: jnp.zeros(jnp.shape(params[name]), dtype) for name in PARAM_NAMES}
  kappa2["W_rec"] = finish(2.0 * vr * k2, e2)
  return kappa1, kappa2


def kappa_ratio(kappa1: dict[str, Any], kappa2: dict[str, Any]) -> dict[str, dict[str, float]]:
  """Summaries of κ^(2)/κ^(1) per leaf: ``sum`` = Σκ^(2)/Σκ^(1), ``max`` and ``median`` of the
  entrywise ratio (over entries with κ^(1) > 0), and ``total`` over all leaves.

  Examples:
    >>> import jax
    >>> from pathsgd_jax import rnn
    >>> params = rnn.init_rnn(jax.random.key(0), 2, 3, recurrent="gaussian")
    >>> ratios = rnn.kappa_ratio(*rnn.kappa_terms(params, 5))
    >>> sorted(ratios), ratios["W_in"]["max"]
    (['W_in', 'W_out', 'W_rec', 'b', 'b_out', 'total'], 0.0)
  """
  out = {}
  tot1 = tot2 = 0.0
  for name in kappa1:
    k1 = np.asarray(kappa1[name], np.float64)
    k2 = np.asarray(kappa2[name], np.float64)
    live = k1 > 0
    entry = k2[live] / k1[live]
    s1, s2 = float(k1.sum()), float(k2.sum())
    tot1, tot2 = tot1 + s1, tot2 + s2
    out[name] = {"sum": s2 / s1 if s1 > 0 else float("nan"),
                 "max": float(entry.max()) if entry.size else float("nan"),
                 "median": float(np.median(entry)) if entry.size else float("nan")}
  out["total"] = {"sum": tot2 / tot1 if tot1 > 0 else float("nan")}
  return out


# ------------------------------------------------------------------------------------------
# Exact reference: every path of the unrolled DAG, float64.
# ------------------------------------------------------------------------------------------


def kappa_terms_bruteforce(params: dict[str, Any], seq_len: int, *, outputs: Any = "last",
                           max_paths: int = 2_000_000) -> tuple[dict[str, np.ndarray],
                                                                dict[str, np.ndarray]]:
  r"""κ^(1) and κ^(2) (``p = 2``) by enumerating every path of the unrolled RNN (float64).

  The DAG: sources ``x_t[k]`` (value 1) and a bias node per step (edges ``b[j]`` into
  ``h_t[j]``); edges ``W_in[k, j]: x_t[k] → h_t[j]`` and ``W_rec[i, j]: h_{t-1}[i] → h_t[j]``
  (``t ≥ 2``: ``h_0 = 0`` is no source); at every read step, edges ``W_out[j, m]: h_t[j] →
  y_t[m]`` and ``b_out[m]`` from a bias node into ``y_t[m]``; sinks ``y_t[m]``. Each path is a
  list of parameter occurrences; κ^(1) adds, for each occurrence, the product of the *other*
  edges' squared weights, and κ^(2) adds, for each *ordered* pair of distinct occurrences of
  the same entry ``w``, ``w²`` times the product of the squared weights of the edges outside
  the pair. Exponential in ``seq_len``: meant for tests (``T ≤ 5``, a few units).

  Args:
    params: ``{"W_in", "W_rec", "b", "W_out", "b_out"}``.
    seq_len: number of unrolled steps.
    outputs: the read steps (see :func:`read_steps`).
    max_paths: refuse (ValueError) networks with more paths than this.

  Returns:
    ``(kappa1, kappa2)`` as dicts of float64 numpy arrays.

  Examples:
    >>> import numpy as np
    >>> from pathsgd_jax import rnn
    >>> params = {"W_in": np.array([[2.0]]), "W_rec": np.array([[3.0]]), "b": np.zeros(1),
    ...           "W_out": np.array([[1.0]]), "b_out": np.zeros(1)}
    >>> k1, k2 = rnn.kappa_terms_bruteforce(params, 3)
    >>> # paths x_1→h_1→h_2→h_3→y (W_rec twice), x_2→…→y (once), x_3→y (never)
    >>> float(k1["W_rec"][0, 0]), float(k2["W_rec"][0, 0])   # 2·4·9 + 4, 2·4·9
    (76.0, 72.0)
  """
  w = {name: np.asarray(params[name], np.float64) for name in PARAM_NAMES}
  d, n = w["W_in"].shape
  k_out = w["W_out"].shape[1]
  read = set(int(s) for s in read_steps(outputs, seq_len))
  last_read = max(read)
  sq = {name: np.square(a) for name, a in w.items()}
  acc1 = {name: np.zeros_like(a) for name, a in w.items()}
  acc2 = {name: np.zeros_like(a) for name, a in w.items()}
  count = 0

  def record(path):
    nonlocal count
    count += 1
    if count > max_paths:
      raise ValueError(f"more than {max_paths} paths: too large for brute force.")
    factors = [sq[name][idx] for name, idx in path]
    for q, (name, idx) in enumerate(path):
      others = 1.0
      for q2, f in enumerate(factors):
        if q2 != q:
          others *= f
      acc1[name][idx] += others
      for r_, (name_r, idx_r) in enumerate(path):
        if r_ == q or name_r != name or idx_r != idx:
          continue
        rest = 1.0
        for q2, f in enumerate(factors):
          if q2 not in (q, r_):
            rest *= f
        acc2[name][idx] += sq[name][idx] * rest

  def from_hidden(t, j, path):
    """All continuations of a path that has reached h_t[j] (t is 0-based)."""
    if t in read:
      for m in range(k_out):
        record(path + [("W_out", (j, m))])
    if t + 1 <= last_read:
      for j2 in range(n):
        from_hidden(t + 1, j2, path + [("W_rec", (j, j2))])

  for t in range(seq_len):
    if t > last_read:
      break
    for j in range(n):
      for k in range(d):
        from_hidden(t, j, [("W_in", (k, j))])
      from_hidden(t, j, [("b", (j,))])
  for t in read:
    for m in range(k_out):
      record([("b_out", (m,))])
  return acc1, acc2
