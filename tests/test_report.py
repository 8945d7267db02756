"""path_structure: warnings by leaf (κ = 0 on a whole leaf, κ over 20 decades) and compact mode.

Which leaves must be warned about follows from hand-built networks: a residual branch behind a
zero scale has no live path through its first layer (κ = 0 there exactly), and rescaling one
hidden unit by c multiplies the κ of its incoming edges by 1/c² and of its outgoing edges by c²
(the brute-force reference confirms the ranges).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pathsgd_jax as psgd
import models_zoo as mz
from reference import mlp_bruteforce, rescale_mlp_units


def residual(params, x):
    """x + s * relu(x @ w1 + b1), then a dense head: the branch is dead when s = 0."""
    branch = jax.nn.relu(x @ params["w1"] + params["b1"][None, :]) @ params["w2"]
    h = x + params["s"][None, :] * branch
    return h @ params["head"]


def _residual_params(scale):
    key = jax.random.split(jax.random.key(0), 4)
    return {"w1": jax.random.normal(key[0], (3, 4)), "b1": 0.1 + jnp.zeros(4),
            "w2": jax.random.normal(key[1], (4, 3)), "s": jnp.full((3,), scale),
            "head": jax.random.normal(key[2], (3, 2))}


def test_zero_scale_warns_by_leaf():
    x = jnp.ones((1, 3))
    report = psgd.path_structure(residual, _residual_params(0.0), x)
    zero = {w.leaf for w in report.warnings if w.kind == "kappa_zero"}
    # Every path through w1, b1, w2 crosses s = 0; s and head stay on live paths.
    assert zero == {"w1", "b1", "w2"}
    assert all(isinstance(w, psgd.StructureWarning) for w in report.warnings)
    text = str(report)
    first_leaf_line = text.index("Parameter leaves:")
    for leaf in ("w1", "b1", "w2"):
        assert text.index(f"! {leaf}: κ = 0 on every entry") < first_leaf_line
    assert "does not move it" in text
    # The healthy network: no warning.
    assert psgd.path_structure(residual, _residual_params(1.0), x).warnings == ()


def _unbalanced_mlp(c):
    params = mz.init_mlp(jax.random.key(1), [3, 4, 2])
    layers = mz.mlp_to_layers(params)
    factors = np.ones(4)
    factors[0] = c
    return rescale_mlp_units(layers, 1, factors)


@pytest.mark.parametrize("c,warned", [(1e11, True), (1e9, False)])
def test_kappa_range_warning_threshold(c, warned):
    layers = _unbalanced_mlp(c)
    with jax.enable_x64(True):
        params = mz.layers_to_mlp(layers, jnp.float64)
        report = psgd.path_structure(mz.mlp_apply, params, jnp.ones((1, 3), jnp.float64))
    _, ref, _ = mlp_bruteforce(layers)
    ratios = {f"{k}/{name}": kap.max() / kap[kap > 0].min()
              for k, (kw, kb) in enumerate(ref) for name, kap in (("w", kw), ("b", kb))}
    expected = {name for name, r in ratios.items() if r > 1e20}
    got = {w.leaf for w in report.warnings if w.kind == "kappa_range"}
    assert bool(expected) == warned
    assert got == expected
    if warned:
        assert "decades" in str(report).split("Parameter leaves:")[0]


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(x.shape[-1])(nn.relu(nn.Dense(8)(x)))


class Deep(nn.Module):
    blocks: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6)(x)
        for _ in range(self.blocks):
            x = Block()(nn.relu(x))
        return nn.Dense(2)(nn.relu(x))


def test_compact_summary_one_line_per_group():
    model, x = Deep(), jnp.ones((1, 3))
    params = model.init(jax.random.key(0), x)["params"]
    # Zero the first dense of Block_2's branch (Dense_1: the outer Dense is created first):
    # every path through the second one's kernel (Dense_0) starts in it, so κ = 0 there;
    # the second one's bias starts its own paths and keeps κ > 0.
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 0 if "Block_2" in jax.tree_util.keystr(path)
        and "Dense_1" in jax.tree_util.keystr(path) else a, params)
    fn = psgd.linen.apply_fn(model)
    report = psgd.path_structure(fn, params, x, compact=True)
    assert {w.leaf for w in report.warnings} == {"Block_2/Dense_0/kernel"}
    text = str(report)
    assert text == report.summary()
    lines = text.splitlines()
    groups = lines[lines.index(next(l for l in lines if l.startswith("Parameter groups"))) + 1:]
    groups = groups[:groups.index("")]
    # One line per layer: Dense_0, Dense_1 and two Dense per block.
    assert len(groups) == 2 + 2 * 3
    assert sum("(1 warned)" in line for line in groups) == 1
    assert text.index("Warnings (1):") < text.index("Parameter groups")
    assert len(lines) < len(report.details().splitlines()) / 2
    # One line per block.
    by_block = report.summary(depth=1).splitlines()
    start = next(i for i, l in enumerate(by_block) if l.startswith("Parameter groups"))
    assert [l.split()[0] for l in by_block[start + 1:start + 6]] == [
        "Block_0", "Block_1", "Block_2", "Dense_0", "Dense_1"]
    assert by_block[start + 6] == ""
    # The full report stays available and lists every leaf.
    full = report.details()
    assert all(leaf.name in full for leaf in report.leaves)
    assert str(dataclasses.replace(report, compact=False)) == full
