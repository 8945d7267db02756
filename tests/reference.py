"""Independent float64 references for path norms and path scales (NumPy only).

Nothing here uses ``pathsgd_jax`` or JAX autodiff. Three independent routes are provided:

* :func:`mlp_bruteforce` enumerates every path of a fully connected network with
  ``itertools.product`` (paths start at an input node or at a bias node and end at an output
  node) and accumulates the products of ``|w|**p`` directly.
* :func:`dag_bruteforce` enumerates every source-to-sink path of an explicit DAG by depth-first
  search. Edges carry a *tag* naming the parameter entry they come from (several edges may share
  one tag, as for convolution kernels) or no tag for non-parameter constants (average pooling
  ``1/k``, identity skip connections, ...).
* :func:`gamma_method` works on networks unrolled into explicit dense layers: one forward pass
  of ``gamma_in`` and one backward pass of ``gamma_out`` through ``|A|**p``; the scale of an
  edge ``u -> v`` is ``gamma_in(u) * gamma_out(v)``, summed over every occurrence of a shared
  parameter entry.

Definitions (Neyshabur, Salakhutdinov & Srebro, NIPS 2015):

    phi_p   = ( sum_paths prod_{e in path} |w_e|^p )^(1/p)
    kappa_e = ( sum_{paths containing e} prod_{e' in path, e' != e} |w_e'|^p )^(2/p)

For a parameter shared by several edges, the inner sum runs over every occurrence (the
derivative of the path sum with respect to ``v = |w|^p``).

Kernels follow the Flax convention ``y = x @ W`` so ``W[i_in, j_out]``; convolution kernels are
``HWIO`` and activations ``NHWC``, flattened row-major.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "mlp_bruteforce",
    "mlp_gamma",
    "mlp_forward",
    "rescale_mlp_units",
    "dag_bruteforce",
    "UnrolledLayer",
    "gamma_method",
    "unrolled_forward",
    "unrolled_bruteforce",
    "dense_layer",
    "conv2d_layer",
    "pool2d_layer",
    "conv2d_forward",
    "cnn_layers",
    "cnn_reference",
    "cnn_forward",
    "residual_mlp_dag",
    "residual_mlp_reference",
    "residual_mlp_forward",
    "same_pads",
    "self_check",
]


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _abs_pow(a, p):
    return np.abs(_f64(a)) ** p


def _others_products(factors):
    """For each position q, the product of all factors except the q-th (no division)."""
    n = len(factors)
    prefix = [1.0] * (n + 1)
    for i, f in enumerate(factors):
        prefix[i + 1] = prefix[i] * f
    suffix = [1.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        suffix[i] = suffix[i + 1] * factors[i]
    return [prefix[q] * suffix[q + 1] for q in range(n)], prefix[n]


# --------------------------------------------------------------------------------------------
# 1. Fully connected networks, brute force with itertools.
# --------------------------------------------------------------------------------------------


def mlp_forward(layers, x):
    """ReLU MLP forward pass in float64: relu on every layer but the last."""
    h = _f64(x)
    for k, (w, b) in enumerate(layers):
        h = h @ _f64(w)
        if b is not None:
            h = h + _f64(b)[None, :]
        if k < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def mlp_bruteforce(layers, p=2.0):
    """Enumerate every path of an MLP.

    Args:
      layers: list of ``(W, b)``; ``W`` has shape ``(n_in, n_out)``; ``b`` is ``(n_out,)`` or
        ``None`` (no bias edges for that layer).
      p: the exponent.

    Returns:
      ``(phi_p, kappas, n_paths)`` with ``kappas`` a list of ``(kappa_W, kappa_b)`` (``kappa_b``
      is ``None`` where ``b`` is ``None``).
    """
    ws = [_f64(w) for w, _ in layers]
    bs = [None if b is None else _f64(b) for _, b in layers]
    n_layers = len(ws)
    widths = [ws[0].shape[0]] + [w.shape[1] for w in ws]
    for k in range(1, n_layers):
        assert ws[k].shape[0] == widths[k], "inconsistent layer widths"
    acc_w = [np.zeros_like(w) for w in ws]
    acc_b = [None if b is None else np.zeros_like(b) for b in bs]
    total = 0.0
    n_paths = 0

    def visit(edges):
        # edges: list of ("W", k, i, j) or ("b", k, j)
        nonlocal total, n_paths
        factors = []
        for e in edges:
            if e[0] == "W":
                factors.append(abs(ws[e[1]][e[2], e[3]]) ** p)
            else:
                factors.append(abs(bs[e[1]][e[2]]) ** p)
        others, prod = _others_products(factors)
        total += prod
        n_paths += 1
        for e, o in zip(edges, others):
            if e[0] == "W":
                acc_w[e[1]][e[2], e[3]] += o
            else:
                acc_b[e[1]][e[2]] += o

    # Paths that start at an input node.
    for units in itertools.product(*[range(n) for n in widths]):
        visit([("W", k, units[k], units[k + 1]) for k in range(n_layers)])
    # Paths that start at the bias node of layer k (an edge into level k + 1).
    for k in range(n_layers):
        if bs[k] is None:
            continue
        for units in itertools.product(*[range(n) for n in widths[k + 1 :]]):
            # units[0] is the unit of level k + 1 that receives the bias edge.
            edges = [("b", k, units[0])]
            edges += [("W", m, units[m - k - 1], units[m - k]) for m in range(k + 1, n_layers)]
            visit(edges)

    kappas = [
        (acc_w[k] ** (2.0 / p), None if acc_b[k] is None else acc_b[k] ** (2.0 / p))
        for k in range(n_layers)
    ]
    return total ** (1.0 / p), kappas, n_paths


def rescale_mlp_units(layers, level, factors):
    """Rescale every hidden unit of ``level`` (1 = first hidden layer) by ``factors``.

    Incoming weights and the bias are multiplied by ``c``, outgoing weights divided by ``c``.
    """
    factors = _f64(factors)
    out = [(_f64(w).copy(), None if b is None else _f64(b).copy()) for w, b in layers]
    assert 1 <= level < len(layers), "only hidden levels can be rescaled"
    w_in, b_in = out[level - 1]
    w_in *= factors[None, :]
    if b_in is not None:
        b_in *= factors
    w_out, _ = out[level]
    w_out /= factors[:, None]
    return out


# --------------------------------------------------------------------------------------------
# 2. General DAGs, brute force by depth-first search.
# --------------------------------------------------------------------------------------------


def dag_bruteforce(edges, sources, sinks, param_shapes, p=2.0):
    """Enumerate every path of an explicit DAG.

    Args:
      edges: iterable of ``(u, v, value, tag)``; ``tag`` is ``(name, index_tuple)`` for an edge
        whose weight is the parameter entry ``params[name][index]``, or ``None`` for a
        non-parameter constant edge.
      sources: nodes where paths start (input nodes and bias nodes).
      sinks: output nodes where paths end.
      param_shapes: ``{name: shape}`` of the parameters referenced by tags.

    Returns:
      ``(phi_p, {name: kappa}, n_paths)``.
    """
    out_edges: dict = {}
    for u, v, value, tag in edges:
        out_edges.setdefault(u, []).append((v, float(value), tag))
    sinks = set(sinks)
    acc = {name: np.zeros(shape, np.float64) for name, shape in param_shapes.items()}
    total = 0.0
    n_paths = 0

    def record(factors, tags):
        nonlocal total, n_paths
        others, prod = _others_products(factors)
        total += prod
        n_paths += 1
        for tag, o in zip(tags, others):
            if tag is not None:
                acc[tag[0]][tag[1]] += o

    def dfs(node, factors, tags, depth):
        if depth > 10_000:
            raise RuntimeError("cycle in DAG")
        if node in sinks:
            record(factors, tags)
        for v, value, tag in out_edges.get(node, ()):
            dfs(v, factors + [abs(value) ** p], tags + [tag], depth + 1)

    for s in sources:
        dfs(s, [], [], 0)
    kappa = {name: a ** (2.0 / p) for name, a in acc.items()}
    return total ** (1.0 / p), kappa, n_paths


# --------------------------------------------------------------------------------------------
# 3. Networks unrolled into explicit dense layers; the gamma_in / gamma_out method.
# --------------------------------------------------------------------------------------------


@dataclass
class UnrolledLayer:
    """One linear layer of an unrolled network: ``y = x @ matrix + bias``.

    ``tags[i, j]`` is the flat index into parameter ``name`` of the entry that ``matrix[i, j]``
    comes from, or -1 when the entry is a non-parameter constant (zero entries with tag -1 are
    not edges at all). Likewise ``bias_tags`` for ``bias``.
    """

    matrix: np.ndarray
    tags: np.ndarray
    name: str | None = None
    bias: np.ndarray | None = None
    bias_tags: np.ndarray | None = None
    bias_name: str | None = None
    relu: bool = True  # activation after the layer (identity in the path network)
    meta: dict = field(default_factory=dict)

    @property
    def shape(self):
        return self.matrix.shape


def unrolled_forward(layers, x_flat):
    """Forward pass of the real network (float64), batch-first flattened input."""
    h = _f64(x_flat)
    for layer in layers:
        h = h @ layer.matrix
        if layer.bias is not None:
            h = h + layer.bias[None, :]
        if layer.relu:
            h = np.maximum(h, 0.0)
    return h


def gamma_method(layers, param_shapes, p=2.0):
    """Path norm and scales of an unrolled layered network by gamma_in / gamma_out sweeps.

    Returns ``(phi_p, {name: kappa})``.
    """
    mats = [_abs_pow(layer.matrix, p) for layer in layers]
    biases = [
        None if layer.bias is None else _abs_pow(layer.bias, p) for layer in layers
    ]
    gamma_in = [np.ones(mats[0].shape[0])]
    for a, c in zip(mats, biases):
        g = gamma_in[-1] @ a
        if c is not None:
            g = g + c
        gamma_in.append(g)
    gamma_out = [np.ones(mats[-1].shape[1])]
    for a in reversed(mats):
        gamma_out.insert(0, a @ gamma_out[0])
    total = float(gamma_in[-1].sum())

    acc = {name: np.zeros(int(np.prod(shape)), np.float64) for name, shape in param_shapes.items()}
    for k, layer in enumerate(layers):
        if layer.name is not None:
            contrib = np.outer(gamma_in[k], gamma_out[k + 1])
            sel = layer.tags >= 0
            np.add.at(acc[layer.name], layer.tags[sel], contrib[sel])
        if layer.bias_name is not None:
            sel = layer.bias_tags >= 0
            # gamma_in of a constant bias node is 1.
            np.add.at(acc[layer.bias_name], layer.bias_tags[sel], gamma_out[k + 1][sel])
    kappa = {
        name: (acc[name] ** (2.0 / p)).reshape(shape) for name, shape in param_shapes.items()
    }
    return total ** (1.0 / p), kappa


def unrolled_dag(layers):
    """Explicit DAG (edges, sources, sinks) of an unrolled layered network, for brute force."""
    edges = []
    n0 = layers[0].shape[0]
    sources = [("n", 0, i) for i in range(n0)]
    for k, layer in enumerate(layers):
        n_in, n_out = layer.shape
        for i in range(n_in):
            for j in range(n_out):
                t = int(layer.tags[i, j])
                if t >= 0:
                    tag = (layer.name, ("flat", t))
                    edges.append((("n", k, i), ("n", k + 1, j), layer.matrix[i, j], tag))
                elif layer.matrix[i, j] != 0.0:
                    edges.append((("n", k, i), ("n", k + 1, j), layer.matrix[i, j], None))
        if layer.bias is not None:
            bias_node = ("bias", k)
            sources.append(bias_node)
            for j in range(n_out):
                t = -1 if layer.bias_tags is None else int(layer.bias_tags[j])
                tag = (layer.bias_name, ("flat", t)) if t >= 0 else None
                edges.append((bias_node, ("n", k + 1, j), layer.bias[j], tag))
    n_last = layers[-1].shape[1]
    sinks = [("n", len(layers), j) for j in range(n_last)]
    return edges, sources, sinks


def unrolled_bruteforce(layers, param_shapes, p=2.0):
    """Brute-force path enumeration on the DAG of an unrolled network.

    Returns ``(phi_p, {name: kappa}, n_paths)``.
    """
    edges, sources, sinks = unrolled_dag(layers)
    # Tags use flat indices: translate ("flat", t) into a flat accumulator.
    flat_shapes = {name: (int(np.prod(shape)),) for name, shape in param_shapes.items()}
    flat_edges = [
        (u, v, val, None if tag is None else (tag[0], (tag[1][1],))) for u, v, val, tag in edges
    ]
    phi, kappa, n_paths = dag_bruteforce(flat_edges, sources, sinks, flat_shapes, p)
    kappa = {name: kappa[name].reshape(shape) for name, shape in param_shapes.items()}
    return phi, kappa, n_paths


def dense_layer(w, b=None, *, name="W", bias_name="b", relu=True):
    """Unrolled dense layer for ``x @ w + b``."""
    w = _f64(w)
    tags = np.arange(w.size).reshape(w.shape)
    layer = UnrolledLayer(matrix=w, tags=tags, name=name, relu=relu)
    if b is not None:
        layer.bias = _f64(b)
        layer.bias_tags = np.arange(layer.bias.size)
        layer.bias_name = bias_name
    return layer


def same_pads(size, k, stride=1):
    """(low, high) padding of XLA/Flax 'SAME' padding."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv2d_layer(in_hw, kernel, bias=None, *, padding="VALID", name="kernel",
                 bias_name="conv_bias", relu=True):
    """Unroll a stride-1 NHWC convolution with an HWIO kernel into a dense matrix.

    Rows index the flattened input ``(h, w, c_in)``, columns the flattened output
    ``(h_out, w_out, c_out)``. Entries that read zero padding are not edges.
    """
    kernel = _f64(kernel)
    height, width = in_hw
    kh, kw, cin, cout = kernel.shape
    if padding == "VALID":
        (pt, pb), (pl, pr) = (0, 0), (0, 0)
    elif padding == "SAME":
        (pt, pb), (pl, pr) = same_pads(height, kh), same_pads(width, kw)
    else:
        raise ValueError(padding)
    ho = height + pt + pb - kh + 1
    wo = width + pl + pr - kw + 1
    n_in = height * width * cin
    n_out = ho * wo * cout
    mat = np.zeros((n_in, n_out))
    tags = -np.ones((n_in, n_out), dtype=np.int64)
    kernel_flat_index = np.arange(kernel.size).reshape(kernel.shape)
    for oi in range(ho):
        for oj in range(wo):
            for di in range(kh):
                for dj in range(kw):
                    ii, ij = oi + di - pt, oj + dj - pl
                    if not (0 <= ii < height and 0 <= ij < width):
                        continue  # zero padding: not a node
                    for ci in range(cin):
                        row = (ii * width + ij) * cin + ci
                        for co in range(cout):
                            col = (oi * wo + oj) * cout + co
                            assert tags[row, col] == -1
                            mat[row, col] = kernel[di, dj, ci, co]
                            tags[row, col] = kernel_flat_index[di, dj, ci, co]
    layer = UnrolledLayer(matrix=mat, tags=tags, name=name, relu=relu,
                          meta={"out_hwc": (ho, wo, cout)})
    if bias is not None:
        bias = _f64(bias)
        layer.bias = np.tile(bias, ho * wo)
        layer.bias_tags = np.tile(np.arange(cout), ho * wo)
        layer.bias_name = bias_name
    return layer


def pool2d_layer(in_hwc, window, *, kind="avg", relu=False):
    """Non-overlapping VALID pooling as a constant matrix.

    ``kind='avg'``: entries ``1/k`` (k = window size); ``kind='sum'``: entries 1 (the path-norm
    convention for max pooling).
    """
    height, width, c = in_hwc
    ph, pw = window
    ho, wo = height // ph, width // pw
    value = 1.0 / (ph * pw) if kind == "avg" else 1.0
    mat = np.zeros((height * width * c, ho * wo * c))
    for oi in range(ho):
        for oj in range(wo):
            for di in range(ph):
                for dj in range(pw):
                    ii, ij = oi * ph + di, oj * pw + dj
                    for ch in range(c):
                        mat[(ii * width + ij) * c + ch, (oi * wo + oj) * c + ch] = value
    tags = -np.ones(mat.shape, dtype=np.int64)
    return UnrolledLayer(matrix=mat, tags=tags, name=None, relu=relu,
                         meta={"out_hwc": (ho, wo, c)})


def conv2d_forward(x, kernel, bias=None, padding="VALID"):
    """Direct (loop) NHWC stride-1 convolution, float64; independent of the unrolling."""
    x = _f64(x)
    kernel = _f64(kernel)
    n, height, width, cin = x.shape
    kh, kw, _, cout = kernel.shape
    if padding == "VALID":
        pads = ((0, 0), (0, 0))
    else:
        pads = (same_pads(height, kh), same_pads(width, kw))
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho = xp.shape[1] - kh + 1
    wo = xp.shape[2] - kw + 1
    y = np.zeros((n, ho, wo, cout))
    for oi in range(ho):
        for oj in range(wo):
            patch = xp[:, oi:oi + kh, oj:oj + kw, :]
            y[:, oi, oj, :] = np.einsum("nhwc,hwcd->nd", patch, kernel)
    if bias is not None:
        y = y + _f64(bias)[None, None, None, :]
    return y


def cnn_layers(in_hwc, kernel, conv_bias, pool, dense_w, dense_b, *, padding="VALID",
               pool_kind="avg"):
    """conv (+bias) -> relu -> pool -> flatten -> dense (+bias), unrolled."""
    height, width, _ = in_hwc
    conv = conv2d_layer((height, width), kernel, conv_bias, padding=padding,
                        name="kernel", bias_name="conv_bias", relu=True)
    pl = pool2d_layer(conv.meta["out_hwc"], pool, kind=pool_kind)
    dense = dense_layer(dense_w, dense_b, name="dense_w", bias_name="dense_b", relu=False)
    assert dense.shape[0] == pl.shape[1], (dense.shape, pl.shape)
    return [conv, pl, dense]


def _cnn_param_shapes(kernel, conv_bias, dense_w, dense_b):
    shapes = {"kernel": np.shape(kernel), "dense_w": np.shape(dense_w)}
    if conv_bias is not None:
        shapes["conv_bias"] = np.shape(conv_bias)
    if dense_b is not None:
        shapes["dense_b"] = np.shape(dense_b)
    return shapes


def cnn_reference(in_hwc, kernel, conv_bias, pool, dense_w, dense_b, *, p=2.0,
                  padding="VALID", pool_kind="avg", method="gamma"):
    """Path norm and scales of the tiny CNN.

    Returns ``(phi_p, {"kernel", "conv_bias", "dense_w", "dense_b": kappa})``.
    """
    layers = cnn_layers(in_hwc, kernel, conv_bias, pool, dense_w, dense_b,
                        padding=padding, pool_kind=pool_kind)
    shapes = _cnn_param_shapes(kernel, conv_bias, dense_w, dense_b)
    if method == "gamma":
        return gamma_method(layers, shapes, p)
    phi, kappa, _ = unrolled_bruteforce(layers, shapes, p)
    return phi, kappa


def cnn_forward(x, kernel, conv_bias, pool, dense_w, dense_b, *, padding="VALID",
                pool_kind="avg"):
    """Real forward pass of the tiny CNN (direct conv, reshape pooling), float64."""
    y = np.maximum(conv2d_forward(x, kernel, conv_bias, padding), 0.0)
    n, height, width, c = y.shape
    ph, pw = pool
    ho, wo = height // ph, width // pw
    y = y[:, : ho * ph, : wo * pw, :].reshape(n, ho, ph, wo, pw, c)
    y = y.mean(axis=(2, 4)) if pool_kind == "avg" else y.max(axis=(2, 4))
    y = y.reshape(n, -1) @ _f64(dense_w)
    if dense_b is not None:
        y = y + _f64(dense_b)[None, :]
    return y


def mlp_gamma(layers, p=2.0):
    """The gamma method applied to an MLP; returns ``(phi_p, [(kappa_W, kappa_b)])``."""
    unrolled = []
    shapes = {}
    for k, (w, b) in enumerate(layers):
        unrolled.append(dense_layer(w, b, name=f"W{k}", bias_name=f"b{k}",
                                    relu=k < len(layers) - 1))
        shapes[f"W{k}"] = np.shape(w)
        if b is not None:
            shapes[f"b{k}"] = np.shape(b)
    phi, kappa = gamma_method(unrolled, shapes, p)
    return phi, [(kappa[f"W{k}"], kappa.get(f"b{k}")) for k in range(len(layers))]


# --------------------------------------------------------------------------------------------
# 4. Residual MLP: h1 = relu(x W1 + b1); h2 = relu(h1 W2 + b2) + h1; out = h2 W3 + b3.
# --------------------------------------------------------------------------------------------


def residual_mlp_forward(params, x, alpha=1.0):
    w1, b1, w2, b2, w3, b3 = (_f64(params[k]) for k in ("W1", "b1", "W2", "b2", "W3", "b3"))
    h1 = np.maximum(_f64(x) @ w1 + b1[None, :], 0.0)
    h2 = alpha * np.maximum(h1 @ w2 + b2[None, :], 0.0) + h1
    return h2 @ w3 + b3[None, :]


def residual_mlp_dag(params, alpha=1.0):
    """Explicit DAG of the residual MLP. ``params``: dict W1, b1, W2, b2, W3, b3.

    ``alpha`` scales the residual branch (a constant edge, not a parameter).
    """
    w1, b1, w2, b2, w3, b3 = (_f64(params[k]) for k in ("W1", "b1", "W2", "b2", "W3", "b3"))
    d_in, d_h = w1.shape
    assert w2.shape == (d_h, d_h), "the skip connection needs equal widths"
    d_out = w3.shape[1]
    edges = []
    for i in range(d_in):
        for j in range(d_h):
            edges.append((("x", i), ("h1", j), w1[i, j], ("W1", (i, j))))
    for j in range(d_h):
        edges.append((("bias", 1), ("h1", j), b1[j], ("b1", (j,))))
    for j in range(d_h):
        for k in range(d_h):
            edges.append((("h1", j), ("a2", k), w2[j, k], ("W2", (j, k))))
    for k in range(d_h):
        edges.append((("bias", 2), ("a2", k), b2[k], ("b2", (k,))))
        # relu(a2) feeds h2 with the constant weight alpha; the skip connection h1 -> h2 has
        # weight 1.
        edges.append((("a2", k), ("h2", k), alpha, None))
        edges.append((("h1", k), ("h2", k), 1.0, None))
    for k in range(d_h):
        for m in range(d_out):
            edges.append((("h2", k), ("out", m), w3[k, m], ("W3", (k, m))))
    for m in range(d_out):
        edges.append((("bias", 3), ("out", m), b3[m], ("b3", (m,))))
    sources = [("x", i) for i in range(d_in)] + [("bias", 1), ("bias", 2), ("bias", 3)]
    sinks = [("out", m) for m in range(d_out)]
    shapes = {k: np.shape(params[k]) for k in ("W1", "b1", "W2", "b2", "W3", "b3")}
    return edges, sources, sinks, shapes


def residual_mlp_reference(params, p=2.0, alpha=1.0):
    """``(phi_p, {name: kappa}, n_paths)`` of the residual MLP by explicit DAG enumeration."""
    edges, sources, sinks, shapes = residual_mlp_dag(params, alpha)
    return dag_bruteforce(edges, sources, sinks, shapes, p)


# --------------------------------------------------------------------------------------------
# Self check: the gamma method agrees with brute force on tiny cases.
# --------------------------------------------------------------------------------------------


def self_check(seed=0, rtol=1e-12):
    """Cross-check gamma method vs brute-force enumeration on a tiny MLP and a tiny CNN."""
    rng = np.random.default_rng(seed)
    for p in (1.0, 2.0, 3.0):
        layers = [(rng.normal(size=(3, 4)), rng.normal(size=4)),
                  (rng.normal(size=(4, 2)), None),
                  (rng.normal(size=(2, 2)), rng.normal(size=2))]
        phi_b, kap_b, _ = mlp_bruteforce(layers, p)
        phi_g, kap_g = mlp_gamma(layers, p)
        np.testing.assert_allclose(phi_g, phi_b, rtol=rtol)
        for (wb, bb), (wg, bg) in zip(kap_b, kap_g):
            np.testing.assert_allclose(wg, wb, rtol=rtol)
            if bb is None:
                assert bg is None
            else:
                np.testing.assert_allclose(bg, bb, rtol=rtol)
        for padding in ("VALID", "SAME"):
            for in_hwc, pool in (((3, 3, 1), (1, 1)), ((4, 4, 1), (2, 2))):
                kernel = rng.normal(size=(2, 2, 1, 2))
                conv_bias = rng.normal(size=2)
                conv = conv2d_layer(in_hwc[:2], kernel, conv_bias, padding=padding)
                n_pool = pool2d_layer(conv.meta["out_hwc"], pool).shape[1]
                dense_w = rng.normal(size=(n_pool, 2))
                dense_b = rng.normal(size=2)
                args = (in_hwc, kernel, conv_bias, pool, dense_w, dense_b)
                phi_g, kap_g = cnn_reference(*args, p=p, padding=padding, method="gamma")
                phi_b, kap_b = cnn_reference(*args, p=p, padding=padding, method="brute")
                np.testing.assert_allclose(phi_g, phi_b, rtol=rtol)
                assert set(kap_g) == set(kap_b) == {"kernel", "conv_bias", "dense_w", "dense_b"}
                for name in kap_g:
                    np.testing.assert_allclose(kap_g[name], kap_b[name], rtol=rtol)
    return True


if __name__ == "__main__":
    self_check()
    print("reference self-check passed")
