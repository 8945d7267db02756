"""Checkpointing Path-SGD with Orbax: save, restore in a fresh process, continue bitwise.

The model, data and training step are one source string, executed here and written into the
script the fresh process runs, so both processes compile the very same step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest

ocp = pytest.importorskip("orbax.checkpoint")

import pathsgd_jax as psgd  # noqa: E402

SHARED = textwrap.dedent('''
    import math

    import jax
    import jax.numpy as jnp
    import optax

    import pathsgd_jax as psgd

    def mlp(params, x):
        h = x
        n = len(params)
        for i in range(n):
            layer = params[f"l{i}"]
            h = h @ layer["w"] + layer["b"][None, :]
            if i < n - 1:
                h = jax.nn.relu(h)
        return h

    def init_params(widths, seed=0):
        keys = jax.random.split(jax.random.key(seed), 2 * (len(widths) - 1))
        params = {}
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            params[f"l{i}"] = {
                "w": jax.random.normal(keys[2 * i], (a, b)) / math.sqrt(a),
                "b": 0.2 * jax.random.normal(keys[2 * i + 1], (b,)),
            }
        return params

    def batch(t, widths, n=16):
        kx, kw = jax.random.split(jax.random.fold_in(jax.random.key(1234), t))
        x = jax.random.normal(kx, (n, widths[0]))
        teacher = jax.random.normal(jax.random.key(99), (widths[0], widths[-1]))
        return x, jnp.sin(x @ teacher)

    def make_tx(widths, refresh_every=3, momentum=0.9):
        return psgd.path_sgd(0.05, mlp, batch(0, widths)[0], momentum=momentum,
                             refresh_every=refresh_every)

    def make_step(tx):
        def loss(params, x, y):
            return jnp.mean((mlp(params, x) - y) ** 2)

        @jax.jit
        def step(params, state, x, y):
            grads = jax.grad(loss)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step

    def train(params, state, step, widths, start, stop):
        for t in range(start, stop):
            params, state = step(params, state, *batch(t, widths))
        return params, state
''')

RESUME = textwrap.dedent('''
    import sys

    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    ckpt_dir, out_file, widths = sys.argv[1], sys.argv[2], tuple(map(int, sys.argv[3:]))
    tx = make_tx(widths)
    params = init_params(widths, seed=7)  # deliberately different: the checkpoint must win
    target = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
    restored = ocp.StandardCheckpointer().restore(ckpt_dir, target)
    params, state = restored["params"], restored["opt_state"]
    assert type(state) is type(tx.init(params)), type(state)
    params, state = train(params, state, make_step(tx), widths, 7, 27)
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path((params, state))}
    np.savez(out_file, **flat)
    print("resumed", int(state[0].count))
''')

WIDTHS = (4, 8, 6, 3)
NS: dict = {}
exec(SHARED, NS)  # noqa: S102


def _flat(tree):
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _save(path, params, state):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()
    checkpointer.close()


@pytest.fixture(scope="module")
def trained():
    """7 steps (to save) and the uninterrupted 27-step run."""
    tx = NS["make_tx"](WIDTHS)
    step = NS["make_step"](tx)
    params = NS["init_params"](WIDTHS)
    p7, s7 = NS["train"](params, tx.init(params), step, WIDTHS, 0, 7)
    p27, s27 = NS["train"](p7, s7, step, WIDTHS, 7, 27)
    return tx, (p7, s7), (p27, s27)


def test_resume_in_a_fresh_process_is_bitwise_identical(trained, tmp_path):
    _, (p7, s7), (p27, s27) = trained
    assert int(s7[0].count) == 7 and s7[0].kappa is not None  # κ cached mid-period
    ckpt = tmp_path / "step7"
    _save(ckpt, p7, s7)
    script = tmp_path / "resume.py"
    script.write_text(SHARED + RESUME)
    out = tmp_path / "resumed.npz"
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, str(script), str(ckpt), str(out), *map(str, WIDTHS)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed 27" in result.stdout
    resumed = dict(np.load(out))
    expected = _flat((p27, s27))
    assert sorted(resumed) == sorted(expected)
    for key, value in expected.items():
        assert resumed[key].dtype == value.dtype, key
        assert np.array_equal(resumed[key], value), (key, resumed[key], value)
    # The run did move: the comparison is not between two copies of the start.
    assert not np.array_equal(expected["[0]['l0']['w']"], np.asarray(p7["l0"]["w"]))


def test_restore_in_process_round_trips_the_state(trained, tmp_path):
    tx, (p7, s7), _ = trained
    _save(tmp_path / "c", p7, s7)
    target = jax.eval_shape(lambda: {"params": p7, "opt_state": tx.init(p7)})
    restored = ocp.StandardCheckpointer().restore(tmp_path / "c", target)
    chex.assert_trees_all_equal_structs(restored["opt_state"], s7)
    chex.assert_trees_all_equal(restored["opt_state"], s7)
    chex.assert_trees_all_equal(restored["params"], p7)
    assert isinstance(restored["opt_state"][0], psgd.ScaleByPathNormState)
    # The cached κ is a tree like the params, so it restores with named leaves.
    chex.assert_trees_all_equal_structs(restored["opt_state"][0].kappa, p7)


# Mismatched checkpoints: only pathsgd_jax.checkpoint's own errors are tested below. (Tests
# of what a bare Orbax restore raises checked Orbax's wording, not this library.)


# ----------------------------------------------------------------- pathsgd_jax.checkpoint


def test_library_save_restore_round_trip_and_continue_bitwise(trained, tmp_path):
    tx, (p7, s7), (p27, s27) = trained
    psgd.checkpoint.save(tmp_path / "c", p7, s7)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), p7)
    params, state = psgd.checkpoint.restore(tmp_path / "c", params=abstract, tx=tx)
    assert type(state) is type(s7) and isinstance(state[0], psgd.ScaleByPathNormState)
    params, state = NS["train"](params, state, NS["make_step"](tx), WIDTHS, 7, 27)
    chex.assert_trees_all_equal((params, state), (p27, s27))


def _library_error(tmp_path, p7, s7, params, tx):
    psgd.checkpoint.save(tmp_path / "c", p7, s7)
    with pytest.raises(psgd.checkpoint.CheckpointMismatchError) as info:
        psgd.checkpoint.restore(tmp_path / "c", params=params, tx=tx)
    return str(info.value)


def test_library_restore_names_leaves_of_another_model(trained, tmp_path):
    _, (p7, s7), _ = trained
    widths = (4, 9, 6, 3)
    msg = _library_error(tmp_path, p7, s7, NS["init_params"](widths), NS["make_tx"](widths))
    assert "params.l0.w: checkpoint (4, 8) float32, expected (4, 9) float32" in msg, msg
    assert "opt_state.0.kappa.l1.w" in msg and "and 1 more" in msg and "another model" in msg, msg


def test_library_restore_names_leaves_of_a_deeper_model(trained, tmp_path):
    _, (p7, s7), _ = trained
    widths = (4, 8, 6, 6, 3)
    msg = _library_error(tmp_path, p7, s7, NS["init_params"](widths), NS["make_tx"](widths))
    assert "lacks (" in msg and "params.l3.w" in msg and "another model" in msg, msg


@pytest.mark.parametrize("config,needle,hint", [
    (dict(refresh_every=1), "opt_state.0.kappa.l0.w", "refresh_every=1, does not keep"),
    (dict(momentum=None), "opt_state.1.trace.l0.w", "momentum differs"),
])
def test_library_restore_explains_another_optimizer_configuration(trained, tmp_path, config,
                                                                   needle, hint):
    _, (p7, s7), _ = trained
    msg = _library_error(tmp_path, p7, s7, p7, NS["make_tx"](WIDTHS, **config))
    assert needle in msg and hint in msg, msg
    assert "params." not in msg, msg


def test_library_restore_explains_a_missing_cache(tmp_path):
    params = NS["init_params"](WIDTHS)
    tx1 = NS["make_tx"](WIDTHS, refresh_every=1)
    msg = _library_error(tmp_path, params, tx1.init(params), params, NS["make_tx"](WIDTHS))
    assert "opt_state.0.kappa.l0.w" in msg and "written with refresh_every=1" in msg, msg


def test_library_restore_of_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint directory"):
        psgd.checkpoint.restore(tmp_path / "nothing", params=NS["init_params"](WIDTHS),
                                tx=NS["make_tx"](WIDTHS))
