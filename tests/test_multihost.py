"""A real two-process run: Path-SGD over a global mesh spanning two JAX processes.

Two subprocesses (each with 2 fake CPU devices, so a 4-device global mesh) call
``jax.distributed.initialize`` against a local coordinator with Gloo CPU collectives, build
globally sharded params and batches, take jitted Path-SGD steps and gather the result on
process 0, which must match a single-process run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import pathsgd_jax as psgd

WIDTHS = (8, 12, 6, 4)
BATCH = 16
STEPS = 5

COMMON = textwrap.dedent('''
    import numpy as np

    WIDTHS, BATCH = (8, 12, 6, 4), 16

    def global_params():
        rng = np.random.default_rng(0)
        params = {}
        for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
            params[f"l{i}"] = {"w": (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32),
                               "b": (0.1 * rng.normal(size=(b,))).astype(np.float32)}
        return params

    def global_batch(t):
        rng = np.random.default_rng(100 + t)
        return (rng.normal(size=(BATCH, WIDTHS[0])).astype(np.float32),
                rng.normal(size=(BATCH, WIDTHS[-1])).astype(np.float32))

    def mlp(params, x):
        import jax
        h = x
        for i in range(len(params)):
            layer = params[f"l{i}"]
            h = h @ layer["w"] + layer["b"][None, :]
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        return h

    def make_step(tx):
        import jax
        import jax.numpy as jnp
        import optax

        @jax.jit
        def step(params, state, x, y):
            grads = jax.grad(lambda prm: jnp.mean((mlp(prm, x) - y) ** 2))(params)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return step
''')

WORKER = textwrap.dedent('''
    import os
    import sys

    process_id, port, steps, out_file = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                         sys.argv[4])
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=50)
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

    import pathsgd_jax as psgd

    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(),
                                                                  jax.devices())
    assert jax.local_device_count() == 2
    # 'data' spans the two processes, 'model' the two devices of each process.
    devices = np.array(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))
    mesh = Mesh(devices.reshape(2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    def spec(a):  # FSDP + tensor parallel kernels, tensor-parallel biases
        if a.ndim == 2:
            return P("data", "model") if a.shape[1] % 2 == 0 else P("data", None)
        return P("model") if a.shape[0] % 2 == 0 else P()

    def global_array(a):
        sharding = NamedSharding(mesh, spec(a))
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    params = jax.tree.map(global_array, global_params())
    data = NamedSharding(mesh, P("data", None))
    rows = slice(process_id * BATCH // 2, (process_id + 1) * BATCH // 2)

    def sharded_batch(t):
        return tuple(jax.make_array_from_process_local_data(data, a[rows], a.shape)
                     for a in global_batch(t))

    x0 = sharded_batch(0)[0]
    assert not x0.is_fully_addressable
    tx = psgd.path_sgd(0.05, mlp, x0, momentum=0.9, refresh_every=2)
    state = jax.jit(tx.init)(params)
    step = make_step(tx)
    for t in range(steps):
        params, state = step(params, state, *sharded_batch(t))
    kappa = jax.jit(lambda prm: psgd.path_scales(mlp, prm, x0))(params)
    for leaf, original in zip(jax.tree.leaves(params), jax.tree.leaves(global_params())):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec(original)),
                                              original.ndim), leaf.sharding
    gathered = multihost_utils.process_allgather((params, kappa, state[1].trace), tiled=True)
    count = int(np.asarray(state[0].count.addressable_data(0)))
    if process_id == 0:
        flat = {jax.tree_util.keystr(path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path(gathered)}
        np.savez(out_file, **flat)
    print(f"process {process_id} done, count {count}", flush=True)
    jax.distributed.shutdown()
''')

NS: dict = {}
exec(COMMON, NS)  # noqa: S102


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_reference(steps):
    device = jax.devices()[0]
    params = jax.device_put(jax.tree.map(jnp.asarray, NS["global_params"]()), device)
    x0 = jnp.asarray(NS["global_batch"](0)[0])
    tx = psgd.path_sgd(0.05, NS["mlp"], x0, momentum=0.9, refresh_every=2)
    state = tx.init(params)
    step = NS["make_step"](tx)
    for t in range(steps):
        params, state = step(params, state, *map(jnp.asarray, NS["global_batch"](t)))
    kappa = jax.jit(lambda prm: psgd.path_scales(NS["mlp"], prm, x0))(params)
    return params, kappa, state[1].trace


def test_two_processes_match_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(COMMON + WORKER)
    out = tmp_path / "final.npz"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(STEPS),
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, cwd=tmp_path) for i in range(2)]
    logs = []
    try:
        for proc in procs:
            stdout, _ = proc.communicate(timeout=60)
            logs.append(stdout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    report = "\n".join(f"--- process {i} (rc {p.returncode}) ---\n{log[-4000:]}"
                       for i, (p, log) in enumerate(zip(procs, logs)))
    assert all(p.returncode == 0 for p in procs), report
    for i in range(2):
        assert f"process {i} done, count {STEPS}" in logs[i], report

    result = dict(np.load(out))
    expected = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
                jax.tree_util.tree_leaves_with_path(_single_process_reference(STEPS))}
    assert sorted(result) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(result[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    start = NS["global_params"]()["l0"]["w"]
    assert not np.allclose(result["[0]['l0']['w']"], start)  # it trained
