"""Recurrent networks: κ^(1) of unrolled ReLU RNNs against brute force, κ^(2), invariance.

The references here use NumPy float64 only: the unrolled RNN is written out as an explicit
DAG (one node per unit and time step, one edge per parameter occurrence, tagged with the
parameter entry it shares) and every path is enumerated by `reference.dag_bruteforce`, which
sums each shared entry's scale over its occurrences (κ^(1) of Neyshabur et al., NIPS 2016).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import pathsgd_jax
import pathsgd_jax.linen as pj_linen
import pathsgd_jax.nnx as pj_nnx
import reference as ref
from pathsgd_jax import rnn, tasks

RTOL32 = 5e-5


# ------------------------------------------------------------------------------------------
# Independent reference: the unrolled DAG, enumerated by reference.dag_bruteforce.
# ------------------------------------------------------------------------------------------


def rnn_dag(params, seq_len, read):
    """Edges/sources/sinks of h_t = relu(x_t W_in + h_{t-1} W_rec + b), y_t = h_t W_out + b_out
    for the 0-based read steps ``read``; h_0 = 0 is no source."""
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    d, n = w["W_in"].shape
    k_out = w["W_out"].shape[1]
    edges, sources, sinks = [], [], []
    for t in range(seq_len):
        for k in range(d):
            sources.append(("x", t, k))
            for j in range(n):
                edges.append((("x", t, k), ("h", t, j), w["W_in"][k, j], ("W_in", (k, j))))
        sources.append(("bias", t))
        for j in range(n):
            edges.append((("bias", t), ("h", t, j), w["b"][j], ("b", (j,))))
        if t > 0:
            for i in range(n):
                for j in range(n):
                    edges.append((("h", t - 1, i), ("h", t, j), w["W_rec"][i, j],
                                  ("W_rec", (i, j))))
        if t in read:
            sources.append(("bias_out", t))
            for m in range(k_out):
                sinks.append(("y", t, m))
                edges.append((("bias_out", t), ("y", t, m), w["b_out"][m], ("b_out", (m,))))
                for j in range(n):
                    edges.append((("h", t, j), ("y", t, m), w["W_out"][j, m],
                                  ("W_out", (j, m))))
    shapes = {k: v.shape for k, v in w.items()}
    return edges, sources, sinks, shapes


def reference_kappa(params, seq_len, read, p=2.0):
    edges, sources, sinks, shapes = rnn_dag(params, seq_len, set(int(t) for t in read))
    return ref.dag_bruteforce(edges, sources, sinks, shapes, p)


def forward_np(params, x, read):
    """The real RNN in float64 (loop over time), outputs at the read steps."""
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h = np.zeros((x.shape[0], w["W_rec"].shape[0]))
    ys = []
    for t in range(x.shape[1]):
        h = np.maximum(np.asarray(x[:, t], np.float64) @ w["W_in"] + h @ w["W_rec"]
                       + w["b"][None, :], 0.0)
        if t in read:
            ys.append(h @ w["W_out"] + w["b_out"][None, :])
    return np.stack(ys, axis=1)


def random_params(seed, d=2, n=3, k=1, scale=0.8):
    """Generic real-valued RNN parameters (no zero entries, mixed signs, non-zero biases)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    shapes = {"W_in": (d, n), "W_rec": (n, n), "b": (n,), "W_out": (n, k), "b_out": (k,)}
    return {name: scale * jax.random.normal(key, shape)
            for key, (name, shape) in zip(keys, shapes.items())}


OUTPUTS = {"last": "last", "all": "all", "mask": [True, False, True, False]}


def _apply(outputs):
    return lambda prm, x: rnn.rnn_apply(prm, x, outputs=outputs)


# ------------------------------------------------------------------------------------------
# κ^(1) = path_scales of the unrolled RNN.
# ------------------------------------------------------------------------------------------


def test_forward_matches_numpy_loop():
    params = random_params(0)
    x = np.asarray(jax.random.uniform(jax.random.key(1), (5, 4, 2)))
    for outputs in OUTPUTS.values():
        read = rnn.read_steps(outputs, 4)
        y = np.asarray(rnn.rnn_apply(params, jnp.asarray(x), outputs=outputs))
        y_ref = forward_np(params, x, set(read.tolist()))
        if outputs == "last":
            y_ref = y_ref[:, 0]
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("outputs", list(OUTPUTS))
@pytest.mark.parametrize("seq_len,n,p", [(4, 3, 2.0), (3, 2, 2.0), (4, 2, 1.0), (4, 3, 3.0)])
def test_kappa1_matches_bruteforce(outputs, seq_len, n, p):
    out = OUTPUTS[outputs]
    if outputs == "mask":
        out = out[:seq_len]
    params = random_params(seq_len * 10 + n, n=n, k=2)
    read = rnn.read_steps(out, seq_len)
    phi_ref, kappa_ref, n_paths = reference_kappa(params, seq_len, read, p)
    assert n_paths > 0
    x = jnp.zeros((7, seq_len, 2))
    kappa = pathsgd_jax.path_scales(_apply(out), params, x, p=p)
    for name in rnn.PARAM_NAMES:
        np.testing.assert_allclose(np.asarray(kappa[name]), kappa_ref[name], rtol=RTOL32,
                                   err_msg=name)
    phi = pathsgd_jax.path_norm(_apply(out), params, x, p=p)
    np.testing.assert_allclose(float(phi), phi_ref, rtol=RTOL32)
    if p == 2.0:  # The library's own float64 enumerator and the O(T n^3) recurrences agree.
        k1_brute, _ = rnn.kappa_terms_bruteforce(params, seq_len, outputs=out)
        k1_fast, _ = rnn.kappa_terms(params, seq_len, outputs=out)
        for name in rnn.PARAM_NAMES:
            np.testing.assert_allclose(k1_brute[name], kappa_ref[name], rtol=1e-12)
            np.testing.assert_allclose(np.asarray(k1_fast[name]), kappa_ref[name],
                                       rtol=RTOL32)


def test_sinks_last_step_vs_every_step():
    """Reading only the last step or every step changes the sinks, hence κ."""
    seq_len = 4
    params = random_params(3)
    x = jnp.zeros((2, seq_len, 2))
    k_last = pathsgd_jax.path_scales(_apply("last"), params, x)
    k_all = pathsgd_jax.path_scales(_apply("all"), params, x)
    _, ref_last, _ = reference_kappa(params, seq_len, [seq_len - 1])
    _, ref_all, _ = reference_kappa(params, seq_len, range(seq_len))
    for name in rnn.PARAM_NAMES:
        np.testing.assert_allclose(np.asarray(k_last[name]), ref_last[name], rtol=RTOL32)
        np.testing.assert_allclose(np.asarray(k_all[name]), ref_all[name], rtol=RTOL32)
        # Every path of the last-step network is a path of the every-step network.
        assert np.all(ref_all[name] >= ref_last[name] * (1 - 1e-12))
    assert float(k_all["b_out"][0]) == seq_len and float(k_last["b_out"][0]) == 1.0
    assert not np.allclose(np.asarray(k_all["W_out"]), np.asarray(k_last["W_out"]))
    # W_out's scale is the path sum into h at the read steps: Σ_t a_t vs a_T.
    k1, _ = rnn.kappa_terms(params, seq_len, outputs="all")
    np.testing.assert_allclose(np.asarray(k1["W_out"]), ref_all["W_out"], rtol=RTOL32)


def test_masking_outputs_with_a_zero_weight_equals_selecting_them():
    """Masking outputs in the loss by multiplying with a constant 0/1 mask (a weight |0|^p = 0)
    gives the κ of the network that reads only the unmasked steps."""
    seq_len = 4
    params = random_params(4)
    mask = np.array([0.0, 1.0, 0.0, 1.0], np.float32)

    def masked(prm, x):
        return rnn.rnn_apply(prm, x, outputs="all") * jnp.asarray(mask)[None, :, None]

    x = jnp.zeros((3, seq_len, 2))
    kappa = pathsgd_jax.path_scales(masked, params, x)
    _, kappa_ref, _ = reference_kappa(params, seq_len, [1, 3])
    for name in rnn.PARAM_NAMES:
        np.testing.assert_allclose(np.asarray(kappa[name]), kappa_ref[name], rtol=RTOL32)


def test_sequence_length_is_read_from_example_input():
    params = random_params(5)
    for seq_len in (2, 3, 4):
        x = jnp.zeros((1, seq_len, 2))
        kappa = pathsgd_jax.path_scales(rnn.rnn_apply, params, x)
        _, kappa_ref, _ = reference_kappa(params, seq_len, [seq_len - 1])
        np.testing.assert_allclose(np.asarray(kappa["W_rec"]), kappa_ref["W_rec"],
                                   rtol=RTOL32)


def test_python_loop_and_scan_agree():
    """The same RNN unrolled by a Python loop (no scan in the jaxpr) gives the same κ."""

    def loop_apply(prm, x):
        h = jnp.zeros((x.shape[0], prm["W_rec"].shape[0]))
        for t in range(x.shape[1]):
            h = jnp.maximum(x[:, t] @ prm["W_in"] + h @ prm["W_rec"] + prm["b"][None, :], 0.0)
        return h @ prm["W_out"] + prm["b_out"][None, :]

    params = random_params(6)
    x = jnp.zeros((1, 4, 2))
    k_loop = pathsgd_jax.path_scales(loop_apply, params, x)
    k_scan = pathsgd_jax.path_scales(rnn.rnn_apply, params, x)
    for name in rnn.PARAM_NAMES:
        np.testing.assert_allclose(np.asarray(k_scan[name]), np.asarray(k_loop[name]),
                                   rtol=RTOL32)


# ------------------------------------------------------------------------------------------
# Flax: Linen nn.RNN(nn.SimpleCell(relu)) and NNX nnx.RNN(nnx.SimpleCell(relu)).
# ------------------------------------------------------------------------------------------


class LinenRNN(nn.Module):
    hidden: int
    outputs: int = 1

    @nn.compact
    def __call__(self, x):
        hs = nn.RNN(nn.SimpleCell(self.hidden, activation_fn=nn.relu,
                                  recurrent_kernel_init=nn.initializers.normal(0.7)))(x)
        return nn.Dense(self.outputs)(hs[:, -1])


class NNXRNN(nnx.Module):
    def __init__(self, d, hidden, outputs, *, rngs):
        self.rnn = nnx.RNN(nnx.SimpleCell(d, hidden, activation_fn=nnx.relu,
                                          recurrent_kernel_init=nnx.initializers.normal(0.7),
                                          rngs=rngs))
        self.out = nnx.Linear(hidden, outputs, rngs=rngs)

    def __call__(self, x):
        return self.out(self.rnn(x)[:, -1])


def _nonzero_biases(tree, seed):
    """Flax initialises biases to 0; give them values so that bias paths are tested too."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([a + 0.3 * jax.random.normal(k, a.shape)
                              for a, k in zip(leaves, keys)])


def test_linen_simple_cell_rnn():
    seq_len, d, n = 4, 2, 3
    model = LinenRNN(n)
    x = jnp.zeros((5, seq_len, d))
    params = _nonzero_biases(model.init(jax.random.key(0), x)["params"], 1)
    cell = params["SimpleCell_0"]
    ours = {"W_in": cell["i"]["kernel"], "b": cell["i"]["bias"], "W_rec": cell["h"]["kernel"],
            "W_out": params["Dense_0"]["kernel"], "b_out": params["Dense_0"]["bias"]}
    xr = jax.random.uniform(jax.random.key(2), (5, seq_len, d))
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, xr)),
                               np.asarray(rnn.rnn_apply(ours, xr)), rtol=1e-5, atol=1e-6)
    kappa = pathsgd_jax.path_scales(pj_linen.apply_fn(model), params, x)
    _, kref, _ = reference_kappa(ours, seq_len, [seq_len - 1])
    got = {"W_in": kappa["SimpleCell_0"]["i"]["kernel"], "b": kappa["SimpleCell_0"]["i"]["bias"],
           "W_rec": kappa["SimpleCell_0"]["h"]["kernel"],
           "W_out": kappa["Dense_0"]["kernel"], "b_out": kappa["Dense_0"]["bias"]}
    for name in rnn.PARAM_NAMES:
        np.testing.assert_allclose(np.asarray(got[name]), kref[name], rtol=RTOL32, err_msg=name)
    # And the optimizer runs on it.
    tx = pathsgd_jax.path_sgd(1e-2, pj_linen.apply_fn(model), x)
    grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, xr) ** 2))(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["SimpleCell_0"]["h"]["kernel"]),
                               -1e-2 * np.asarray(grads["SimpleCell_0"]["h"]["kernel"])
                               / kref["W_rec"], rtol=1e-4)


def test_nnx_simple_cell_rnn():
    seq_len, d, n = 4, 2, 3
    model = NNXRNN(d, n, 1, rngs=nnx.Rngs(0))
    cell = model.rnn.cell
    # Flax initialises biases to 0; give them values so that bias paths are tested too.
    cell.dense_i.bias[...] = cell.dense_i.bias[...] + jnp.array([0.3, -0.2, 0.5])
    model.out.bias[...] = model.out.bias[...] + 0.4
    ours = {"W_in": cell.dense_i.kernel[...], "b": cell.dense_i.bias[...],
            "W_rec": cell.dense_h.kernel[...], "W_out": model.out.kernel[...],
            "b_out": model.out.bias[...]}
    assert float(jnp.abs(ours["b"]).min()) > 0
    xr = jax.random.uniform(jax.random.key(2), (5, seq_len, d))
    np.testing.assert_allclose(np.asarray(model(xr)), np.asarray(rnn.rnn_apply(ours, xr)),
                               rtol=1e-5, atol=1e-6)
    x = jnp.zeros((5, seq_len, d))
    params = nnx.state(model, nnx.Param)
    kappa = pathsgd_jax.path_scales(pj_nnx.apply_fn(model), params, x)
    _, kref, _ = reference_kappa(ours, seq_len, [seq_len - 1])
    got = {"W_in": kappa["rnn"]["cell"]["dense_i"]["kernel"],
           "b": kappa["rnn"]["cell"]["dense_i"]["bias"],
           "W_rec": kappa["rnn"]["cell"]["dense_h"]["kernel"],
           "W_out": kappa["out"]["kernel"], "b_out": kappa["out"]["bias"]}
    for name in rnn.PARAM_NAMES:
        value = got[name][...] if isinstance(got[name], nnx.Variable) else got[name]
        np.testing.assert_allclose(np.asarray(value), kref[name], rtol=RTOL32, err_msg=name)
    # nnx.Optimizer runs Path-SGD on it.
    optimizer = nnx.Optimizer(model, pathsgd_jax.path_sgd(1e-3, pj_nnx.apply_fn(model), x),
                              wrt=nnx.Param)
    grads = nnx.grad(lambda m: jnp.mean(m(xr) ** 2))(model)
    optimizer.update(model, grads)
    assert np.all(np.isfinite(np.asarray(model(xr))))


# ------------------------------------------------------------------------------------------
# κ^(2): brute force vs the O(T n^3) recurrences vs the Hessian of the tied path sum.
# ------------------------------------------------------------------------------------------


def _path_sum_tied(v, seq_len, read):
    """g(v) of the RNN's path network written directly (v = w², all-ones input)."""
    u = jnp.sum(v["W_in"], axis=0) + v["b"]
    r = jnp.sum(v["W_out"], axis=1)
    a = jnp.zeros_like(u)
    g = 0.0
    for t in range(seq_len):
        a = a @ v["W_rec"] + u
        if t in read:
            g = g + a @ r + jnp.sum(v["b_out"])
    return g


def test_kappa2_hand_example():
    params = {"W_in": np.array([[2.0]]), "W_rec": np.array([[3.0]]), "b": np.zeros(1),
              "W_out": np.array([[1.0]]), "b_out": np.zeros(1)}
    k1, k2 = rnn.kappa_terms_bruteforce(params, 3)
    # Paths: x1->h1->h2->h3->y: 4*9*9*1 (W_rec twice); x2->h2->h3->y: 4*9; x3->h3->y: 4.
    assert k1["W_rec"][0, 0] == 2 * 4 * 9 + 4
    assert k2["W_rec"][0, 0] == 2 * 4 * 9  # two ordered pairs, w² * (4 * 1)
    assert k1["W_in"][0, 0] == 81 + 9 + 1 and k2["W_in"][0, 0] == 0
    f1, f2 = rnn.kappa_terms(params, 3)
    np.testing.assert_allclose(np.asarray(f1["W_rec"]), k1["W_rec"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f2["W_rec"]), k2["W_rec"], rtol=1e-6)


@pytest.mark.parametrize("outputs", ["last", "all", [1, 3]])
@pytest.mark.parametrize("init", ["random", "identity"])
def test_kappa2_three_routes(outputs, init):
    seq_len = 5 if outputs == "last" else 4
    if init == "random":
        params = random_params(7, n=3, k=2)
    else:
        params = rnn.init_rnn(jax.random.key(8), 2, 3, 2, recurrent="identity")
        params["W_rec"] = params["W_rec"] + 0.2 * jax.random.normal(jax.random.key(9), (3, 3))
        params["b"] = params["b"] + 0.1
    k1_b, k2_b = rnn.kappa_terms_bruteforce(params, seq_len, outputs=outputs)
    k1_f, k2_f = rnn.kappa_terms(params, seq_len, outputs=outputs)
    read = set(rnn.read_steps(outputs, seq_len).tolist())
    v = {k: jnp.square(jnp.asarray(a)) for k, a in params.items()}
    grad = jax.grad(_path_sum_tied)(v, seq_len, read)
    hess_diag = jnp.diag(jax.hessian(
        lambda vr: _path_sum_tied(dict(v, W_rec=vr), seq_len, read))(v["W_rec"]).reshape(9, 9))
    np.testing.assert_allclose(np.asarray(grad["W_rec"]), k1_b["W_rec"], rtol=RTOL32)
    np.testing.assert_allclose(np.asarray(v["W_rec"] * hess_diag.reshape(3, 3)),
                               k2_b["W_rec"], rtol=1e-4)
    for name in rnn.PARAM_NAMES:
        np.testing.assert_allclose(np.asarray(k1_f[name]), k1_b[name], rtol=RTOL32)
        np.testing.assert_allclose(np.asarray(k2_f[name]), k2_b[name], rtol=1e-4, atol=0)
        if name != "W_rec":
            assert np.all(k2_b[name] == 0)
    assert k2_b["W_rec"].sum() > 0
    ratios = rnn.kappa_ratio(k1_f, k2_f)
    np.testing.assert_allclose(ratios["W_rec"]["sum"], k2_b["W_rec"].sum()
                               / k1_b["W_rec"].sum(), rtol=1e-4)


def test_kappa_terms_normalised_and_long_sequences():
    params = rnn.init_rnn(jax.random.key(0), 2, 6, recurrent="gaussian", recurrent_scale=3.0)
    k1, k2 = rnn.kappa_terms(params, 6)
    n1, n2 = rnn.kappa_terms(params, 6, normalize=True)
    phi2 = float(pathsgd_jax.path_norm(rnn.rnn_apply, params, jnp.ones((1, 6, 2)))) ** 2
    for name in rnn.PARAM_NAMES:
        np.testing.assert_allclose(np.asarray(n1[name]) * phi2, np.asarray(k1[name]), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(n2[name]) * phi2, np.asarray(k2[name]), rtol=1e-4)
    # 200 steps of a path network with gain ~9 per step (path sums ~1e190, beyond float32):
    # κ/φ² stays finite and κ^(1)/φ² matches the library's overflow-free path network.
    seq_len = 200
    n1, n2 = jax.jit(lambda p: rnn.kappa_terms(p, seq_len, normalize=True))(params)
    lib = pathsgd_jax.path_scales(rnn.rnn_apply, params, jnp.ones((1, seq_len, 2)),
                                  normalize=True)
    for name in rnn.PARAM_NAMES:
        assert np.all(np.isfinite(np.asarray(n1[name]))) and np.all(
            np.isfinite(np.asarray(n2[name])))
        np.testing.assert_allclose(np.asarray(n1[name]), np.asarray(lib[name]), rtol=2e-3)


# ------------------------------------------------------------------------------------------
# Invariance of whole trajectories under per-unit rescalings applied at every time step.
# ------------------------------------------------------------------------------------------


def _trajectories(tx, starts, x, y, n_steps, outputs):
    """Network outputs along ``n_steps`` steps of ``tx`` from each start (one compilation)."""
    apply = _apply(outputs)

    @jax.jit
    def run(prm):
        def body(carry, _):
            prm, state = carry
            g = jax.grad(lambda q: jnp.mean((apply(q, x) - y) ** 2))(prm)
            updates, state = tx.update(g, state, prm)
            prm = optax.apply_updates(prm, updates)
            return (prm, state), apply(prm, x)

        _, outs = jax.lax.scan(body, (prm, tx.init(prm)), None, length=n_steps)
        return outs

    return [np.asarray(run(start), np.float64) for start in starts]


@pytest.mark.parametrize("outputs", ["last", "all"])
def test_path_sgd_trajectories_invariant_to_unit_rescaling(outputs):
    seq_len, n = 5, 4
    params = rnn.init_rnn(jax.random.key(1), 2, n, recurrent="gaussian", input_std=0.7,
                          output_std=0.5)
    params["b"] = params["b"] + 0.1
    c = jnp.array([4.0, 0.25, 2.0, 0.5])
    scaled = rnn.rescale_hidden_units(params, c)
    x = jax.random.uniform(jax.random.key(2), (16, seq_len, 2))
    y = jax.random.uniform(jax.random.key(3), (16, seq_len, 1) if outputs == "all" else (16, 1))
    apply = _apply(outputs)
    np.testing.assert_allclose(np.asarray(apply(scaled, x)), np.asarray(apply(params, x)),
                               rtol=1e-5, atol=1e-6)
    for tx in (pathsgd_jax.path_sgd(0.05, apply, x),
               pathsgd_jax.path_sgd(0.02, apply, x, momentum=0.9)):
        a, b = _trajectories(tx, [params, scaled], x, y, 12, outputs)
        assert np.abs(a[-1] - a[0]).max() > 1e-2  # it did move
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)
    # SGD is not invariant: the same experiment leaves the original trajectory.
    a, b = _trajectories(optax.sgd(0.05), [params, scaled], x, y, 12, outputs)
    assert np.abs(b - a).max() > 10 * (1e-3 * np.abs(a).max() + 1e-4)


def test_kappa2_transforms_like_kappa1_under_rescaling():
    """κ^(2) is a sum of products of squared path weights too: per-unit rescalings scale
    κ^(2)(W_rec[i, j]) by (c_i / c_j)², exactly like κ^(1); the ratio is invariant."""
    params = random_params(11, n=3)
    c = np.array([3.0, 0.5, 1.5])
    scaled = rnn.rescale_hidden_units(params, jnp.asarray(c))
    k1, k2 = rnn.kappa_terms_bruteforce(params, 4)
    s1, s2 = rnn.kappa_terms_bruteforce(scaled, 4)
    factor = (c[:, None] / c[None, :]) ** 2
    np.testing.assert_allclose(s1["W_rec"], k1["W_rec"] * factor, rtol=1e-5)
    np.testing.assert_allclose(s2["W_rec"], k2["W_rec"] * factor, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Tasks.
# ------------------------------------------------------------------------------------------


def test_adding_problem_convention_and_baseline():
    seq_len = 30
    x, y = tasks.adding_problem(4000, seq_len, seed=0)
    assert x.shape == (4000, seq_len, 2) and y.shape == (4000, 1) and x.dtype == np.float32
    marker = x[..., 1]
    assert np.all(marker.sum(1) == 2)
    assert np.all(marker[:, :seq_len // 2].sum(1) == 1)
    assert np.all(marker[:, seq_len // 2:].sum(1) == 1)
    assert np.all((x[..., 0] >= 0) & (x[..., 0] < 1))
    np.testing.assert_allclose(y[:, 0], (x[..., 0] * marker).sum(1), rtol=1e-6)
    # Predicting 1 gives MSE ≈ 1/6; both halves' positions are used uniformly.
    assert abs(np.mean((y - 1.0) ** 2) - tasks.ADDING_BASELINE_MSE) < 0.01
    first = marker[:, :seq_len // 2].argmax(1)
    assert set(first.tolist()) == set(range(seq_len // 2))
    # Seeded and reproducible; train and test come from independent streams.
    s1 = tasks.adding_splits(seq_len, n_train=10, n_test=5, seed=3)
    s2 = tasks.adding_splits(seq_len, n_train=20, n_test=5, seed=3)
    np.testing.assert_array_equal(s1["test"][0], s2["test"][0])
    np.testing.assert_array_equal(s1["train"][0], tasks.adding_splits(
        seq_len, n_train=10, n_test=7, seed=3)["train"][0])
    assert not np.array_equal(s1["train"][0][:5], s1["test"][0])


def test_sequential_mnist_variants():
    ds = pathsgd_jax.data.load("mnist5k")
    rows = tasks.sequential_mnist("row")
    pixels = tasks.sequential_mnist("pixel")
    assert rows.input_shape == (28, 28) and pixels.input_shape == (784, 1)
    np.testing.assert_array_equal(rows.x_train[0], ds.x_train[0, :, :, 0])
    np.testing.assert_array_equal(pixels.x_train[0, :, 0], ds.x_train[0].reshape(-1))
    np.testing.assert_array_equal(rows.y_test, ds.y_test)
    perm = tasks.sequential_mnist("pixel", permuted=True, seed=1)
    assert not np.array_equal(perm.x_train[0], pixels.x_train[0])
    np.testing.assert_allclose(np.sort(perm.x_train[0, :, 0]), np.sort(pixels.x_train[0, :, 0]))
    with pytest.raises(ValueError, match="permuted=True is defined for the pixel"):
        tasks.sequential_mnist("row", permuted=True)


def test_scan_unroll_and_reverse_time():
    """`unroll` does not change κ; a scan run backwards over time is the RNN on the reversed
    sequence (its path network reads the same DAG with time reversed)."""
    params = random_params(12)
    x = jnp.zeros((1, 4, 2))
    base = pathsgd_jax.path_scales(rnn.rnn_apply, params, x)
    unrolled = pathsgd_jax.path_scales(lambda p, v: rnn.rnn_apply(p, v, unroll=2), params, x)

    def reverse_apply(prm, v):
        def step(h, x_t):
            h = jax.nn.relu(x_t @ prm["W_in"] + h @ prm["W_rec"] + prm["b"][None, :])
            return h, None

        h0 = jnp.zeros((v.shape[0], prm["W_rec"].shape[0]))
        h, _ = jax.lax.scan(step, h0, jnp.swapaxes(v, 0, 1), reverse=True)
        return h @ prm["W_out"] + prm["b_out"][None, :]

    reversed_ = pathsgd_jax.path_scales(reverse_apply, params, x)
    _, kref, _ = reference_kappa(params, 4, [3])
    for name in rnn.PARAM_NAMES:
        for got in (base, unrolled, reversed_):
            np.testing.assert_allclose(np.asarray(got[name]), kref[name], rtol=RTOL32)
