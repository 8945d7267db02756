"""Property tests on random layered ReLU architectures (hypothesis), in float64.

Architectures: 1 to 5 weight layers, widths 1 to 8, biases per layer or not, and optional
skip connections ``z_{i+2} += h_i`` (into the pre-activation of level i+2, from the input or a
hidden level) where the widths match; p in [1, 4]. Checked against a brute-force enumeration
of every path of the explicit DAG (``reference.dag_bruteforce``):

* κ (including weights that are exactly zero: dead paths) and φ_p;
* invariance of φ_p, of the network function and of the Path-SGD step (mapped back through
  the rescaling) under random per-unit rescalings compatible with the skip connections.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import pathsgd_jax as psgd
from reference import dag_bruteforce

MAX_PATHS = 1500  # keeps the Python enumeration fast


@dataclass(frozen=True)
class Arch:
    widths: tuple[int, ...]  # widths[0] inputs, widths[-1] outputs
    bias: tuple[bool, ...]  # per weight layer
    skips: tuple[int, ...]  # levels k >= 2 that receive h_{k-2}

    @property
    def depth(self) -> int:
        return len(self.widths) - 1


def _path_count(widths, skips):
    # Paths ending at each node of a level, starting anywhere (inputs or biases): an upper
    # bound computed level by level (every layer counted as biased).
    counts = [1] * widths[0]
    levels = [counts]
    for k in range(1, len(widths)):
        total = sum(levels[k - 1]) + 1
        level = [total] * widths[k]
        if k in skips:
            level = [c + levels[k - 2][j] for j, c in enumerate(level)]
        levels.append(level)
    return sum(levels[-1])


@st.composite
def architectures(draw):
    depth = draw(st.integers(1, 5))
    widths = []
    for k in range(depth + 1):
        # Often repeat the width two levels down, so that skip connections are possible.
        if k >= 2 and draw(st.booleans()):
            widths.append(widths[k - 2])
        else:
            widths.append(draw(st.integers(1, 8)))
    while _path_count(widths, ()) > MAX_PATHS // 2:
        # Shrink every level of the largest width together: equal widths stay equal.
        largest = max(widths)
        widths = [w - 1 if w == largest else w for w in widths]
    bias = tuple(draw(st.booleans()) for _ in range(depth))
    candidates = [k for k in range(2, depth + 1) if widths[k] == widths[k - 2]]
    skips = tuple(k for k in candidates if draw(st.booleans()))
    return Arch(tuple(widths), bias, skips)


def make_apply(arch: Arch):
    def apply_fn(params, x):
        levels = [x]
        h = x
        for k in range(arch.depth):
            layer = params[f"l{k}"]
            z = h @ layer["w"]
            if "b" in layer:
                z = z + layer["b"][None, :]
            if k + 1 in arch.skips:
                z = z + levels[k - 1]
            h = jax.nn.relu(z) if k + 1 < arch.depth else z
            levels.append(h)
        return h
    return apply_fn


def make_params(arch: Arch, seed: int, zero_fraction: float = 0.0):
    rng = np.random.default_rng(seed)
    params = {}
    for k in range(arch.depth):
        a, b = arch.widths[k], arch.widths[k + 1]
        w = rng.normal(size=(a, b)) * rng.choice([0.3, 1.0, 3.0])
        layer = {"w": w}
        if arch.bias[k]:
            layer["b"] = rng.normal(size=(b,))
        if zero_fraction:
            for name in layer:
                layer[name] = np.where(rng.uniform(size=layer[name].shape) < zero_fraction, 0.0,
                                       layer[name])
        params[f"l{k}"] = layer
    return params


def bruteforce(arch: Arch, params, p):
    edges, param_shapes = [], {}
    sources = [(0, i) for i in range(arch.widths[0])]
    for k in range(arch.depth):
        w = params[f"l{k}"]["w"]
        param_shapes[f"l{k}/w"] = w.shape
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                edges.append(((k, i), (k + 1, j), w[i, j], (f"l{k}/w", (i, j))))
        if "b" in params[f"l{k}"]:
            b = params[f"l{k}"]["b"]
            param_shapes[f"l{k}/b"] = b.shape
            sources.append(("bias", k))
            for j in range(b.shape[0]):
                edges.append((("bias", k), (k + 1, j), b[j], (f"l{k}/b", (j,))))
        if k + 1 in arch.skips:
            for j in range(arch.widths[k + 1]):
                edges.append(((k - 1, j), (k + 1, j), 1.0, None))
    sinks = [(arch.depth, j) for j in range(arch.widths[-1])]
    phi, kappa, _ = dag_bruteforce(edges, sources, sinks, param_shapes, p)
    return phi, {name: {leaf: kappa[f"{name}/{leaf}"] for leaf in layer}
                 for name, layer in params.items()}


def random_rescaling(arch: Arch, seed: int):
    """Factors c > 0 per hidden unit, equal along skip connections and 1 where a skip reaches
    the input or the output (the identity skip edge cannot absorb a factor)."""
    rng = np.random.default_rng(seed)
    parent = {}

    def find(u):
        while parent.setdefault(u, u) != u:
            u = parent[u]
        return u

    for k in arch.skips:
        for j in range(arch.widths[k]):
            parent[find((k, j))] = find((k - 2, j))
    factors = {}
    fixed = {find((0, j)) for j in range(arch.widths[0])} | {
        find((arch.depth, j)) for j in range(arch.widths[-1])}
    levels = []
    for k in range(arch.depth + 1):
        level = []
        for j in range(arch.widths[k]):
            root = find((k, j))
            if root not in factors:
                factors[root] = 1.0 if root in fixed else float(np.exp(rng.normal() * 1.5))
            level.append(factors[root])
        levels.append(np.asarray(level))
    return levels


def rescale(params, levels):
    out = {}
    for k in range(len(levels) - 1):
        layer = params[f"l{k}"]
        new = {"w": layer["w"] * levels[k + 1][None, :] / levels[k][:, None]}
        if "b" in layer:
            new["b"] = layer["b"] * levels[k + 1]
        out[f"l{k}"] = new
    return out


def to_jax(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


# Skips from the input, between hidden levels and into the output, with and without biases.
SKIPPY = Arch((3, 3, 3, 3, 3, 3), (True, False, True, False, True), (2, 3, 4, 5))

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


@PROPERTY
@given(arch=architectures(), p=st.floats(1.0, 4.0), seed=st.integers(0, 2**31 - 1),
       zeros=st.sampled_from([0.0, 0.0, 0.3]))
@example(arch=SKIPPY, p=3.0, seed=1, zeros=0.0)
def test_kappa_matches_bruteforce(arch, p, seed, zeros):
    params = make_params(arch, seed, zeros)
    apply_fn = make_apply(arch)
    x = jnp.ones((2, arch.widths[0]), jnp.float64)
    # One compilation per example (eager evaluation compiles every primitive for every new
    # shape, which is slower for architectures that never repeat).
    # (φ_p against brute force is checked in the invariance test, which computes it anyway.)
    kappa = jax.jit(lambda prm: psgd.path_scales(apply_fn, prm, x, p=p))(to_jax(params))
    _, kappa_ref = bruteforce(arch, params, p)
    assert kappa["l0"]["w"].dtype == jnp.float64
    for name, layer in kappa_ref.items():
        for leaf, ref in layer.items():
            scale = max(float(np.max(ref)), 1e-300)
            np.testing.assert_allclose(np.asarray(kappa[name][leaf]), ref, rtol=1e-9,
                                       atol=1e-12 * scale, err_msg=f"{arch} {name}/{leaf}")


@PROPERTY
@given(arch=architectures(), p=st.floats(1.0, 4.0), seed=st.integers(0, 2**31 - 1),
       momentum=st.sampled_from([None, 0.9]))
@example(arch=Arch((3, 4, 4, 4, 2), (True, True, False, True), (3,)), p=1.5, seed=2,
         momentum=0.9)
def test_phi_and_path_sgd_step_invariant_under_rescaling(arch, p, seed, momentum):
    params = make_params(arch, seed)
    levels = random_rescaling(arch, seed + 1)
    rescaled = rescale(params, levels)
    apply_fn = make_apply(arch)
    rng = np.random.default_rng(seed + 2)
    x = jnp.asarray(rng.normal(size=(6, arch.widths[0])))
    y = jnp.asarray(rng.normal(size=(6, arch.widths[-1])))

    def loss(prm):
        return jnp.mean((apply_fn(prm, x) - y) ** 2)

    tx = psgd.path_sgd(0.01, apply_fn, x, p=p, momentum=momentum)

    # Both networks have the same shapes: one compilation per example serves all four steps.
    @jax.jit
    def step(w, state):
        updates, state = tx.update(jax.grad(loss)(w), state, w)
        phi = psgd.path_norm(apply_fn, w, x, p=p)
        return jax.tree.map(lambda v, u: v + u, w, updates), state, phi

    a, b = to_jax(params), to_jax(rescaled)
    # Sanity: the rescaling leaves the function unchanged.
    np.testing.assert_allclose(np.asarray(apply_fn(b, x)), np.asarray(apply_fn(a, x)),
                               rtol=1e-9, atol=1e-9)
    sa, sb = tx.init(a), tx.init(b)
    phi_ref = bruteforce(arch, params, p)[0]
    for t in range(2):  # two steps, so momentum carries a rescaled direction too
        a, sa, phi_a = step(a, sa)
        b, sb, phi_b = step(b, sb)
        if t == 0:
            np.testing.assert_allclose(float(phi_a), phi_ref, rtol=1e-9)  # φ_p is right
        np.testing.assert_allclose(float(phi_b), float(phi_a), rtol=1e-9)  # φ_p invariant
    # Path-SGD commutes with the rescaling: A(ρ(w)) = ρ(A(w)).
    mapped = rescale(jax.tree.map(np.asarray, a), levels)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(b),
                                 jax.tree.leaves(mapped)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-8, atol=1e-10,
                                   err_msg=f"{arch} {jax.tree_util.keystr(path)}")
    np.testing.assert_allclose(np.asarray(apply_fn(b, x)), np.asarray(apply_fn(a, x)),
                               rtol=1e-8, atol=1e-9)
