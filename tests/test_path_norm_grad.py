"""The path norm as a regulariser: jax.grad of path_norm against a float64 brute-force
enumeration, its rescaling behaviour, and the README's `loss + λ·φ₂²` recipe.

Derivation (a parameter on each path at most once, as in an MLP): with
S_e = Σ_{paths ∋ e} Π_{e' ≠ e} |w_e'|^p (= κ_e^{p/2}),

    ∂φ_p^p / ∂w_e = p · sign(w_e) · |w_e|^{p-1} · S_e,
    ∂φ_p² / ∂w_e  = (2/p) · φ_p^{2-p} · ∂φ_p^p / ∂w_e      (= 2 · w_e · κ_e for p = 2).

A rescaling ρ multiplies w_e by d_e = c_v / c_u (edge u -> v; c = 1 on inputs, outputs and the
bias node) and leaves φ unchanged, so ∇φ(ρ(w)) = ∇φ(w) / d_e: it transforms like a gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pathsgd_jax as psgd
import models_zoo as mz
from reference import mlp_bruteforce, rescale_mlp_units

WIDTHS = [3, 4, 3, 2]

# Biases after the first layer guard against the path network's power-of-two gradient
# shift (the `_shifted` VJP that κ undoes) leaking into the true gradient of path_norm: with
# the shift kept, their gradient came out x2 (or x0.5) while weights stayed exact.
LEAF_KINDS = ["w", "b"]


def _reference_grad_phi_sq(layers, p):
    """∇ φ_p² by brute-force path enumeration (NumPy float64)."""
    phi, kappas, _ = mlp_bruteforce(layers, p=p)
    out = []
    for (w, b), (kw, kb) in zip(layers, kappas):
        grads = []
        for value, kappa in ((w, kw), (b, kb)):
            s = kappa ** (p / 2.0)  # Σ over paths through the entry of the other factors
            d_phi_p = p * np.sign(value) * np.abs(value) ** (p - 1.0) * s
            grads.append((2.0 / p) * phi ** (2.0 - p) * d_phi_p)
        out.append(tuple(grads))
    return phi, out


def _grad_phi_sq(params, p):
    x = jnp.ones((1, WIDTHS[0]), jnp.float64)
    return jax.grad(lambda prm: psgd.path_norm(mz.mlp_apply, prm, x, p=p) ** 2)(params)


@pytest.mark.parametrize("p,kind", [
    (1.0, "w"), (2.0, "w"), (3.0, "w"), (3.0, "b"),
    (1.0, "b"), (2.0, "b")])
def test_gradient_matches_bruteforce(p, kind):
    with jax.enable_x64(True):
        params = mz.init_mlp(jax.random.key(0), WIDTHS, dtype=jnp.float64)
        layers = mz.mlp_to_layers(params)
        _, ref = _reference_grad_phi_sq(layers, p)
        grads = _grad_phi_sq(params, p)
    for g, (rw, rb) in zip(grads, ref):
        want = rw if kind == "w" else rb
        np.testing.assert_allclose(np.asarray(g[kind]), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", LEAF_KINDS)
def test_gradient_p2_is_two_w_kappa(kind):
    with jax.enable_x64(True):
        params = mz.init_mlp(jax.random.key(1), WIDTHS, dtype=jnp.float64)
        grads = _grad_phi_sq(params, 2.0)
    _, kappas, _ = mlp_bruteforce(mz.mlp_to_layers(params), p=2.0)
    for g, layer, (kw, kb) in zip(grads, params, kappas):
        kappa = kw if kind == "w" else kb
        np.testing.assert_allclose(np.asarray(g[kind]), 2 * np.asarray(layer[kind]) * kappa,
                                   rtol=1e-10)


@pytest.mark.parametrize("kind", LEAF_KINDS)
def test_rescaling_phi_invariant_gradient_covariant(kind):
    factors = mz.random_rescaling(3, WIDTHS)
    with jax.enable_x64(True):
        params = mz.init_mlp(jax.random.key(2), WIDTHS, dtype=jnp.float64)
        scaled = mz.rescale_mlp_params(params, factors)
        x = jnp.ones((1, WIDTHS[0]), jnp.float64)
        phi = float(psgd.path_norm(mz.mlp_apply, params, x))
        phi_scaled = float(psgd.path_norm(mz.mlp_apply, scaled, x))
        grads, grads_scaled = _grad_phi_sq(params, 2.0), _grad_phi_sq(scaled, 2.0)
    np.testing.assert_allclose(phi_scaled, phi, rtol=1e-12)
    # d_e: the factor the rescaling applies to each entry (rescale a network of ones).
    ones = [(np.ones_like(w), np.ones_like(b)) for w, b in mz.mlp_to_layers(params)]
    for level, c in enumerate(factors, start=1):
        ones = rescale_mlp_units(ones, level, c)
    moved = False
    for g, gs, (dw, db) in zip(grads, grads_scaled, ones):
        d = dw if kind == "w" else db
        np.testing.assert_allclose(np.asarray(gs[kind]), np.asarray(g[kind]) / d, rtol=1e-10)
        moved |= not np.allclose(np.asarray(gs[kind]), np.asarray(g[kind]))
    assert moved  # the rescaling was not the identity


def test_readme_regulariser_recipe():
    apply_fn = mz.mlp_apply
    params0 = mz.init_mlp(jax.random.key(4), [6, 8, 3])
    x = jax.random.normal(jax.random.key(5), (32, 6))
    y = jax.random.randint(jax.random.key(6), (32,), 0, 3)

    def run(lam, steps=20):
        # The README's loss: cross-entropy + λ·φ₂² (x[:1] only gives the input shape).
        def loss(params, x, y):
            logits = apply_fn(params, x)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + lam * psgd.path_norm(apply_fn, params, x[:1]) ** 2

        tx = optax.sgd(0.05)
        step = jax.jit(lambda prm, st: _sgd_step(tx, loss, prm, st, x, y))
        params, state = params0, tx.init(params0)
        for _ in range(steps):
            params, state = step(params, state)
        return float(psgd.path_norm(apply_fn, params, x[:1]))

    assert run(0.1) < 0.8 * run(0.0)


def _sgd_step(tx, loss, params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
