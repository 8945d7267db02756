"""Step time and compiled memory of ``path_sgd`` against ``optax.sgd`` and ``optax.adagrad``.

Each variant is one jitted train step ``(params, opt_state, x, y) -> (params, opt_state)``
(softmax cross-entropy, parameters and optimizer state donated) on a fixed random batch.
Variants are timed *interleaved* in one process: every repeat runs each variant once, in an
order rotated from repeat to repeat, for ``number`` consecutive steps, after ``warmup``
untimed repeats; the reported step time is the median over repeats of (repeat time /
``number``). With ``refresh_every = k`` Path-SGD recomputes κ every k-th step only, so
``number`` should be a multiple of every k (the default is their least common multiple) for
the refresh steps to be counted at their true frequency.

Memory comes from XLA's compiled-memory analysis of each step
(``jax.jit(step).lower(...).compile().memory_analysis()``): argument, output, alias and
temporary buffer sizes, and their combination ``argument + output - alias + temp`` as an
estimate of the step's peak. Where the device reports memory statistics (GPU/TPU) the
process-wide peak is printed as well; the CPU backend reports none.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pathsgd_jax
from pathsgd_jax.experiments import common, models, resnets


def time_interleaved(fns: Mapping[str, Callable[[], Any]], *, repeats: int = 30,
                     warmup: int = 2, number: int = 1) -> dict[str, dict[str, Any]]:
  """Times callables interleaved; the reusable timing core of the benchmark.

  Args:
    fns: ``name -> fn``; ``fn()`` must run ``number`` steps and block until they finish.
    repeats: timed repeats per callable.
    warmup: untimed repeats first (compilation, caches).
    number: steps each call runs; times are divided by it.

  Returns:
    ``name -> {"median_s", "q25_s", "q75_s", "min_s", "times_s"}`` per step.
  """
  names = list(fns)
  times: dict[str, list[float]] = {n: [] for n in names}
  for r in range(warmup + repeats):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      t0 = time.perf_counter()
      fns[name]()
      dt = (time.perf_counter() - t0) / number
      if r >= warmup:
        times[name].append(dt)
  out = {}
  for name, ts in times.items():
    q = np.quantile(ts, [0.25, 0.75]) if ts else [math.nan, math.nan]
    out[name] = {"median_s": statistics.median(ts) if ts else math.nan,
                 "q25_s": float(q[0]), "q75_s": float(q[1]),
                 "min_s": min(ts) if ts else math.nan, "times_s": ts}
  return out


def memory_of(compiled) -> dict[str, Any]:
  """Sizes from ``compiled.memory_analysis()`` (bytes); empty if the backend gives none."""
  try:
    ma = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {e}"}
  if ma is None:
    return {}
  out = {}
  for field in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes"):
    v = getattr(ma, field, None)
    if v is not None:
      out[field.replace("_in_bytes", "")] = int(v)
  if {"argument_size", "output_size", "temp_size"} <= out.keys():
    out["peak_estimate"] = (out["argument_size"] + out["output_size"]
                            - out.get("alias_size", 0) + out["temp_size"])
  return out


def device_memory_stats() -> dict[str, Any] | None:
  """``jax.devices()[0].memory_stats()`` (None on CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return dict(stats) if stats else None


@dataclasses.dataclass
class Network:
  """A benchmark network: parameters, deterministic apply and an input batch."""

  name: str
  description: str
  params: Any
  apply: Callable[[Any, jax.Array], jax.Array]
  x: jax.Array
  y: jax.Array

  @property
  def num_params(self) -> int:
    return int(sum(np.prod(np.shape(l)) for l in jax.tree.leaves(self.params)))


def mlp_network(sizes: Sequence[int], batch: int, seed: int = 0) -> Network:
  """The paper's MLP, e.g. ``784-4000-4000-10``."""
  kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
  params = models.mlp_init(kp, list(sizes))
  x = jax.random.uniform(kx, (batch, sizes[0]), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, sizes[-1], jnp.int32)
  return Network("mlp", f"MLP {'-'.join(map(str, sizes))}, batch {batch}", params,
                 models.mlp_forward, x, y)


def cnn_network(image_size: int, image_channels: int, channels: Sequence[int], classes: int,
                batch: int, seed: int = 0) -> Network:
  """The small CIFAR-style CNN of :func:`pathsgd_jax.experiments.models.cnn_apply`."""
  kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
  shape = (image_size, image_size, image_channels)
  params = models.cnn_init(kp, shape, classes, channels)
  x = jax.random.uniform(kx, (batch,) + shape, jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, classes, jnp.int32)
  desc = (f"CNN {image_size}x{image_size}x{image_channels} -> "
          + " -> ".join(f"conv3x3 {c}, relu, avgpool2" for c in channels)
          + f" -> dense {classes}, batch {batch}")
  return Network("cnn", desc, params, models.cnn_apply, x, y)


def resnet_network(depth: int, image_size: int, batch: int, classes: int = 10,
                   seed: int = 0) -> Network:
  """A ResNet v1.5 of :mod:`pathsgd_jax.experiments.resnets` with eval-mode BatchNorm.

  The running statistics are random (as after some training), constants of ``apply``.
  """
  kp, ks, kx, ky = jax.random.split(jax.random.key(seed), 4)
  model, variables = resnets.init(depth, image_size, kp, classes=classes)
  stats = variables["batch_stats"]
  leaves, treedef = jax.tree.flatten(stats)
  keys = jax.random.split(ks, len(leaves))
  stats = treedef.unflatten([  # means around 0, variances around 1
      0.1 * jax.random.normal(k, l.shape) if i % 2 == 0 else
      jnp.exp(0.2 * jax.random.normal(k, l.shape)) for i, (k, l) in enumerate(zip(keys, leaves))])

  def apply(params, x):
    return model.apply({"params": params, "batch_stats": stats}, x)

  x = jax.random.uniform(kx, (batch, image_size, image_size, 3), jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, classes, jnp.int32)
  return Network(f"resnet{depth}", f"ResNet{depth} v1.5 (eval-mode BatchNorm) "
                 f"{image_size}x{image_size}x3, batch {batch}", variables["params"], apply, x, y)


def optimizer_variants(net: Network, refresh: Sequence[int], momentum: float = 0.9,
                       lr: float = 1e-4, ddp_alphas: Sequence[float] = ()
                       ) -> dict[str, optax.GradientTransformation]:
  """``sgd`` (momentum), ``adagrad``, ``path-sgd`` (momentum) for each refresh period and
  ``ddp-sgd`` (momentum) for each α of ``ddp_alphas``."""
  out = {"sgd": optax.sgd(lr, momentum=momentum), "adagrad": optax.adagrad(lr),
         "adam": optax.adam(lr)}
  for k in refresh:
    out[f"path-sgd (refresh {k})"] = pathsgd_jax.path_sgd(
        lr, net.apply, net.x, momentum=momentum, refresh_every=k)
  for alpha in ddp_alphas:
    out[f"ddp-sgd (alpha {alpha:g})"] = pathsgd_jax.ddp_sgd(lr, net.apply, net.x, alpha=alpha,
                                                            momentum=momentum)
  return out


def make_step(apply: Callable, tx: optax.GradientTransformation) -> Callable:
  """The jitted, donating train step timed by the benchmark."""

  def step(params, opt_state, x, y):
    def loss_fn(p):
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y))

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, inputs=x)  # DDP reads the batch
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step, donate_argnums=(0, 1))


class _WeightReader:
  """Reads every weight matrix once per call (``number`` times): κ's bandwidth floor."""

  def __init__(self, params, number):
    weights = [leaf for leaf in jax.tree.leaves(params) if np.ndim(leaf) >= 2]
    self.read = jax.jit(lambda ws: sum(jnp.sum(jnp.square(w)) for w in ws))
    self.weights, self.number = weights, number

  def __call__(self):
    for _ in range(self.number):
      out = self.read(self.weights)
    jax.block_until_ready(out)


class _Stepper:
  """Holds one variant's state and runs ``number`` steps per call."""

  def __init__(self, compiled, params, opt_state, x, y, number):
    self.compiled, self.params, self.opt_state = compiled, params, opt_state
    self.x, self.y, self.number = x, y, number

  def __call__(self):
    for _ in range(self.number):
      self.params, self.opt_state = self.compiled(self.params, self.opt_state, self.x, self.y)
    jax.block_until_ready((self.params, self.opt_state))


def bench_network(net: Network, *, refresh: Sequence[int] = (1, 10),
                  ddp_alphas: Sequence[float] = (), repeats: int = 30,
                  warmup: int = 2, number: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
  """Times and sizes every optimizer variant on ``net``; returns a JSON-friendly dict."""
  if number is None:
    number = math.lcm(*refresh) if refresh else 1
  variants = optimizer_variants(net, refresh, ddp_alphas=ddp_alphas)
  steppers, info = {}, {}
  for name, tx in variants.items():
    params = jax.tree.map(jnp.copy, net.params)
    opt_state = tx.init(params)
    t0 = time.perf_counter()
    lowered = make_step(net.apply, tx).lower(params, opt_state, net.x, net.y)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    # trace_time_s: tracing and lowering to StableHLO (Python); xla_compile_time_s: XLA.
    info[name] = {"compile_time_s": t2 - t0, "trace_time_s": t1 - t0,
                  "xla_compile_time_s": t2 - t1, "memory": memory_of(compiled),
                  "opt_state_bytes": int(sum(np.asarray(l).nbytes
                                             for l in jax.tree.leaves(opt_state)))}
    steppers[name] = _Stepper(compiled, params, opt_state, net.x, net.y, number)
  base_mem = info["sgd"]["memory"].get("peak_estimate")
  for name in variants:
    info[name]["compile_ratio_to_sgd"] = (info[name]["compile_time_s"]
                                          / info["sgd"]["compile_time_s"])
    peak = info[name]["memory"].get("peak_estimate")
    info[name]["memory_ratio_to_sgd"] = (peak / base_mem) if peak and base_mem else None
  out = {"description": net.description, "num_params": net.num_params,
         "batch": int(net.x.shape[0]), "number": number, "repeats": repeats,
         "warmup": warmup, "variants": info}
  if not repeats:  # compile and memory only
    log(f"[bench] {net.description}: {net.num_params:,} parameters; compiled, not timed")
    return out
  steppers[_READ] = _WeightReader(net.params, number)
  log(f"[bench] {net.description}: {net.num_params:,} parameters; timing {len(steppers)} "
      f"variants x {repeats} repeats x {number} steps (interleaved, {warmup} warm-up)")
  timings = time_interleaved(steppers, repeats=repeats, warmup=warmup, number=number)
  read = timings.pop(_READ)
  base = timings["sgd"]["median_s"]
  for name in variants:
    info[name].update(timings[name])
    info[name]["ratio_to_sgd"] = timings[name]["median_s"] / base
    # Robust to a machine shared with other jobs: the ratio within each repeat (the variants
    # of one repeat run back to back) and the ratio of the fastest repeats.
    info[name]["ratio_to_sgd_paired"] = statistics.median(
        a / b for a, b in zip(timings[name]["times_s"], timings["sgd"]["times_s"]))
    info[name]["ratio_to_sgd_min"] = timings[name]["min_s"] / timings["sgd"]["min_s"]
  # The path network reads each weight matrix twice (its forward and backward pass), on top
  # of the training step: a floor for κ every step, whatever the implementation.
  floor = {"weight_read_median_s": read["median_s"],
           "ratio_floor": 1.0 + 2.0 * read["median_s"] / base}
  out["kappa_bandwidth_floor"] = floor
  return out


def format_bench(results: dict) -> str:
  """The summary table of a bench results dict, and κ's bandwidth floor per network."""
  rows, notes = [], []
  for net_name, net in results["networks"].items():
    for name, v in net["variants"].items():
      mem = v["memory"]
      timed = "median_s" in v
      ms = lambda key: f"{v[key] * 1e3:.2f}" if timed else "-"
      ratio = lambda key: f"{v[key]:.3f}" if timed else "-"
      rows.append([net_name, name, ms("median_s"),
                   f"{v['q25_s'] * 1e3:.2f}-{v['q75_s'] * 1e3:.2f}" if timed else "-",
                   ms("min_s"), ratio("ratio_to_sgd"), ratio("ratio_to_sgd_paired"),
                   ratio("ratio_to_sgd_min"),
                   _mib(mem.get("peak_estimate")), _mib(mem.get("temp_size")),
                   _mib(mem.get("argument_size")),
                   "-" if v["memory_ratio_to_sgd"] is None else f"{v['memory_ratio_to_sgd']:.3f}",
                   f"{v['trace_time_s']:.1f}", f"{v['compile_time_s']:.1f}",
                   f"{v['compile_ratio_to_sgd']:.2f}"])
    floor = net.get("kappa_bandwidth_floor")
    if floor:
      notes.append(f"{net_name}: one read of all weight matrices takes "
                   f"{floor['weight_read_median_s'] * 1e3:.2f} ms; the path network reads them "
                   f"twice, so κ at every step costs at least {floor['ratio_floor']:.3f}x SGD "
                   "unless those reads are shared with the training step.")
  table = common.table(["network", "optimizer", "median ms", "IQR ms", "min ms", "t/sgd",
                        "t/sgd paired", "t/sgd min", "peak MiB est.", "temp MiB", "args MiB",
                        "mem/sgd", "trace s", "compile s", "compile/sgd"], rows)
  return "\n".join([table] + notes)


def _mib(b: int | None) -> str:
  return "-" if b is None else f"{b / 2**20:.1f}"


def plot_bench(results: dict):
  """Bar charts of median step time and estimated peak memory per network and optimizer."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  nets = list(results["networks"])
  fig = Figure(figsize=(4.2 * max(len(nets), 1) + 0.4, 6.0), layout="constrained")
  axes = fig.subplots(2, max(len(nets), 1), squeeze=False)
  for c, net_name in enumerate(nets):
    variants = results["networks"][net_name]["variants"]
    names = list(variants)
    nan = {"median_s": math.nan, "q25_s": math.nan, "q75_s": math.nan}
    timed = [variants[n] if "median_s" in variants[n] else nan for n in names]
    t = [v["median_s"] * 1e3 for v in timed]
    err = [[v["median_s"] * 1e3 - v["q25_s"] * 1e3 for v in timed],
           [v["q75_s"] * 1e3 - v["median_s"] * 1e3 for v in timed]]
    mem = [(variants[n]["memory"].get("peak_estimate") or 0) / 2**20 for n in names]
    colors = ["tab:red" if n.startswith("path") else "tab:gray" for n in names]
    axes[0, c].bar(range(len(names)), t, yerr=err, color=colors)
    axes[0, c].set_ylabel("step time (ms, median, IQR)")
    axes[0, c].set_title(textwrap.fill(results["networks"][net_name]["description"], 48),
                         fontsize=8)
    axes[1, c].bar(range(len(names)), mem, color=colors)
    axes[1, c].set_ylabel("peak memory estimate (MiB)")
    for ax in axes[:, c]:
      ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
      ax.grid(True, axis="y", alpha=0.3)
  fig.suptitle(f"path_sgd vs optax on {results['environment']['jax_backend']} "
               f"({', '.join(results['environment']['devices'][:1])})", fontsize=10)
  return fig


_READ = "weight read"


@dataclasses.dataclass
class BenchConfig:
  """Configuration of :func:`run_bench`."""

  networks: Sequence[str] = ("mlp", "cnn")  # and resnet18, resnet34, resnet50, ...
  mlp_sizes: Sequence[int] = (784, 4000, 4000, 10)
  cnn_channels: Sequence[int] = (32, 64)
  image_size: int = 32
  image_channels: int = 3
  classes: int = 10
  batch: int = 100
  refresh_every: Sequence[int] = (1, 10)
  ddp_alphas: Sequence[float] = ()
  repeats: int = 30
  warmup: int = 2
  number: int | None = None
  seed: int = 0
  resnet_image_size: int = 32
  resnet_batch: int = 2


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
  """Runs the benchmark; returns the dict written to ``results.json``."""
  if any(k < 1 for k in cfg.refresh_every):
    raise common.ConfigError("--refresh-every values must be positive integers.")
  if cfg.repeats < 0 or cfg.batch < 1:
    raise common.ConfigError("--repeats must be >= 0 (0: compile only) and --batch positive.")
  t0 = time.perf_counter()
  results = {"command": "bench", "config": dataclasses.asdict(cfg),
             "environment": common.environment(), "networks": {}}
  for name in cfg.networks:
    if name == "mlp":
      net = mlp_network(cfg.mlp_sizes, cfg.batch, cfg.seed)
    elif name == "cnn":
      net = cnn_network(cfg.image_size, cfg.image_channels, cfg.cnn_channels, cfg.classes,
                        cfg.batch, cfg.seed)
    elif name.startswith("resnet") and name[6:].isdigit() and int(name[6:]) in resnets.STAGES:
      net = resnet_network(int(name[6:]), cfg.resnet_image_size, cfg.resnet_batch,
                           cfg.classes, cfg.seed)
    else:
      raise common.ConfigError(f"Unknown network {name!r}; choose mlp, cnn or one of "
                               f"{', '.join(resnets.names())}.")
    results["networks"][name] = bench_network(net, refresh=cfg.refresh_every,
                                              ddp_alphas=cfg.ddp_alphas,
                                              repeats=cfg.repeats, warmup=cfg.warmup,
                                              number=cfg.number, log=log)
  results["device_memory_stats"] = device_memory_stats()
  results["wall_time_s"] = time.perf_counter() - t0
  return results
