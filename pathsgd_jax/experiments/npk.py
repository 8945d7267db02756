"""The role of gates: ReLU networks against deep gated networks with frozen or learnt gates.

Lakshminarayanan & Singh (NeurIPS 2020) split a ReLU network into its gates (neural path
features) and its weights (neural path values). This study trains, on each data set and for
a fully connected network (5 hidden layers of 128) and a small CNN with global average
pooling (avgpool2 of the image, then conv3x3 8 - avgpool2 - conv3x3 16 - avgpool2 - conv3x3 16
- GAP - dense; --cnn-input-pool 1 keeps the full image), five variants built with
`pathsgd_jax.gated`:

* relu: the ReLU network itself;
* flnpf: gates copied from that trained ReLU network and frozen; a fresh value network
  trained (frozen learnt NPF);
* frnpf-ii: gates of a random network, frozen; the value network from an independent
  initialisation (frozen random NPF, independent init);
* frnpf-di: the same, with the value network initialised at the gate network's weights
  (dependent init);
* decoupled: gate and value networks both trained, soft gates (1 + ε)·sigmoid(β·q)
  (decoupled learning of NPF and NPV; evaluated with the same soft gates).

Training: softmax cross-entropy, SGD with momentum 0.9, batch 64, He-normal weights and zero
biases; for every variant each learning rate of --lr-grid is trained for --epochs and the one
with the lowest final validation error (10% of the training split) is kept. The neural path
kernel of the ReLU network (and of the decoupled run's gate network) is computed each epoch
on --kernel-examples validation examples; its centred alignment with the labels
⟨K_c, Y_c⟩/(‖K_c‖·‖Y_c‖), Y = one-hot·one-hotᵀ, is stored and plotted. Outputs in --out:
results.json, npk.png (alignment per epoch; test accuracy per variant).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import pathsgd_jax as psgd
from pathsgd_jax.experiments import common, plotting

ARCHS = ("fc", "cnn")
VARIANTS = ("relu", "flnpf", "frnpf-ii", "frnpf-di", "decoupled")
# The authors' test accuracies (%), for context: full MNIST, fully connected, SGD; CIFAR-10,
# CNN with global average pooling.
REFERENCE = {("mnist", "fc"): {"frnpf": 95.85, "decoupled": 97.86, "flnpf": 97.10, "relu": 97.85},
             ("cifar10", "cnn"): {"frnpf": 67.4, "flnpf": 78.5, "relu": 78.9}}


@dataclasses.dataclass(frozen=True)
class NPKConfig:
  """Options of the NPK experiment (see ``pathsgd-jax npk --help``)."""

  datasets: tuple[str, ...] = ("mnist5k",)
  data_dir: str | None = None
  archs: tuple[str, ...] = ARCHS
  variants: tuple[str, ...] = VARIANTS
  width: int = 128
  depth: int = 5
  channels: tuple[int, ...] = (8, 16, 16)
  cnn_input_pool: int = 2
  epochs: int = 10
  batch_size: int = 64
  lr_grid: tuple[float, ...] = (0.01, 0.03, 0.1)
  momentum: float = 0.9
  beta: float = 4.0
  epsilon: float = 0.1
  kernel_examples: int = 48
  train_subset: int | None = None
  test_subset: int | None = None
  val_fraction: float = 0.1
  seed: int = 0
  out: str = os.path.join("runs", "npk")

  def __post_init__(self):
    for name, allowed, got in (("arch", ARCHS, self.archs), ("variant", VARIANTS, self.variants)):
      bad = [g for g in got if g not in allowed]
      if bad:
        raise common.ConfigError(f"unknown {name}(s) {bad}; choose among {list(allowed)}")
    if "flnpf" in self.variants and "relu" not in self.variants:
      raise common.ConfigError("flnpf copies the gates of the trained relu run: include relu")
    if not self.lr_grid or min(self.lr_grid) <= 0:
      raise common.ConfigError("--lr-grid needs positive learning rates")


# --------------------------------------------------------------------------------- networks
def _he(key, shape, fan_in):
  return jax.random.normal(key, shape) * np.sqrt(2.0 / fan_in)


def fc_init(key, d_in, width, depth, n_out):
  sizes = [d_in] + [width] * depth + [n_out]
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": _he(k, (a, b), a), "b": jnp.zeros(b)} for k, a, b in zip(keys, sizes, sizes[1:])]


def fc_apply(params, x):
  h = x.reshape(x.shape[0], -1)
  for layer in params[:-1]:
    h = jax.nn.relu(h @ layer["w"] + layer["b"][None, :])
  return h @ params[-1]["w"] + params[-1]["b"][None, :]


def cnn_init(key, c_in, channels, n_out):
  keys = jax.random.split(key, len(channels) + 1)
  params, prev = [], c_in
  for k, c in zip(keys, channels):
    params.append({"w": _he(k, (3, 3, prev, c), 9 * prev), "b": jnp.zeros(c)})
    prev = c
  params.append({"w": _he(keys[-1], (prev, n_out), prev), "b": jnp.zeros(n_out)})
  return params


def _avg_pool(h, k):
  return lax.reduce_window(h, 0.0, lax.add, (1, k, k, 1), (1, k, k, 1), "VALID") / float(k * k)


def cnn_apply(params, x, input_pool=1):
  h = _avg_pool(x, input_pool) if input_pool > 1 else x
  for i, layer in enumerate(params[:-1]):
    if i:
      h = _avg_pool(h, 2)
    h = lax.conv_general_dilated(h, layer["w"], (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(h + layer["b"][None, None, None, :])
  h = jnp.mean(h, axis=(1, 2))
  return h @ params[-1]["w"] + params[-1]["b"][None, :]


def _network(arch, cfg: NPKConfig, shape, n_out):
  if arch == "fc":
    return (lambda k: fc_init(k, int(np.prod(shape)), cfg.width, cfg.depth, n_out)), fc_apply
  pool = cfg.cnn_input_pool
  return ((lambda k: cnn_init(k, shape[-1], cfg.channels, n_out)),
          lambda params, x: cnn_apply(params, x, pool))


# --------------------------------------------------------------------------------- training
def alignment(kernel, labels, num_classes):
  """Centred kernel-target alignment of a kernel with the one-hot labels."""
  k = np.asarray(kernel, np.float64)
  y = np.eye(num_classes)[np.asarray(labels)]
  n = len(k)
  h = np.eye(n) - 1.0 / n
  kc, yc = h @ k @ h, h @ (y @ y.T) @ h
  return float(np.sum(kc * yc) / (np.linalg.norm(kc) * np.linalg.norm(yc) + 1e-300))


def _train(variant, apply_fn, value, gate, lr, data, cfg: NPKConfig, kernel_fn, log):
  """Trains one variant at one learning rate; returns its curves and final parameters."""
  gated_apply = psgd.gated(apply_fn)
  soft = psgd.SoftGates(cfg.beta, cfg.epsilon)
  trains_gate = variant == "decoupled"

  def forward(params, x):
    v, g = params
    if variant == "relu":
      return apply_fn(v, x)
    return gated_apply(v, g, x, soft=soft if trains_gate else None)

  def loss_fn(trainable, frozen, x, y):
    params = trainable if trains_gate else (trainable, frozen)
    logits = forward(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = optax.sgd(lr, momentum=cfg.momentum)
  trainable = (value, gate) if trains_gate else value
  frozen = None if trains_gate else gate

  @jax.jit
  def epoch(trainable, opt_state, xb, yb):
    def step(carry, batch):
      p, s = carry
      loss, grads = jax.value_and_grad(loss_fn)(p, frozen, *batch)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), loss
    (trainable, opt_state), losses = lax.scan(step, (trainable, opt_state), (xb, yb))
    return trainable, opt_state, losses.mean()

  @jax.jit
  def accuracy(trainable, x, y):
    params = trainable if trains_gate else (trainable, frozen)
    return jnp.mean(jnp.argmax(forward(params, x), -1) == y)

  opt_state = tx.init(trainable)
  (xtr, ytr), (xva, yva), (xte, yte), xk = data
  n_batches = len(xtr) // cfg.batch_size
  rng = np.random.default_rng(cfg.seed + 1)
  curves = {"train_loss": [], "val_error": [], "alignment": []}

  def kernel_alignment(trainable):
    if kernel_fn is None or variant not in ("relu", "decoupled"):
      return None
    gate_params = trainable[1] if trains_gate else trainable
    return alignment(kernel_fn(gate_params, xk[0]), xk[1], data[-1][2])

  curves["alignment"].append(kernel_alignment(trainable))
  for _ in range(cfg.epochs):
    order = rng.permutation(len(xtr))[:n_batches * cfg.batch_size].reshape(n_batches, -1)
    trainable, opt_state, loss = epoch(trainable, opt_state, xtr[order], ytr[order])
    curves["train_loss"].append(float(loss))
    curves["val_error"].append(1.0 - float(accuracy(trainable, xva, yva)))
    curves["alignment"].append(kernel_alignment(trainable))
  test = float(accuracy(trainable, xte, yte))
  result = {"variant": variant, "lr": lr, "test_accuracy": test,
            "val_error": curves["val_error"][-1], "curves": curves}
  if trains_gate:
    v, g = trainable
    result["test_accuracy_hard_gates"] = float(jnp.mean(jnp.argmax(
        gated_apply(v, g, xte), -1) == yte))
  else:
    v, g = trainable, gate
  log(f"  {variant:>9} lr={lr:g}: val error {result['val_error']:.4f}, test acc {test:.4f}")
  return result, v, g


def _data(name, cfg: NPKConfig):
  ds = psgd.data.load(name, cfg.data_dir)
  rng = np.random.default_rng(cfg.seed)
  x, y = ds.x_train, ds.y_train
  if cfg.train_subset is not None:
    keep = rng.permutation(len(x))[:cfg.train_subset]
    x, y = x[keep], y[keep]
  xte, yte = ds.x_test, ds.y_test
  if cfg.test_subset is not None:
    keep = rng.permutation(len(xte))[:cfg.test_subset]
    xte, yte = xte[keep], yte[keep]
  perm = rng.permutation(len(x))
  n_val = max(1, int(round(cfg.val_fraction * len(x))))
  val, train = perm[:n_val], perm[n_val:]
  k = min(cfg.kernel_examples, n_val)
  return ((jnp.asarray(x[train]), jnp.asarray(y[train])),
          (jnp.asarray(x[val]), jnp.asarray(y[val])), (jnp.asarray(xte), jnp.asarray(yte)),
          (jnp.asarray(x[val][:k]), np.asarray(y[val][:k]), ds.num_classes))


def run_npk(cfg: NPKConfig, log=print) -> dict:
  """Runs the study; writes results.json and npk.png in ``cfg.out``; returns the results."""
  start = time.time()
  runs, summary = [], []
  for name in cfg.datasets:
    data = _data(name, cfg)
    shape, n_out = data[0][0].shape[1:], data[-1][2]
    log(f"{name}: {len(data[0][0])} train / {len(data[1][0])} val / {len(data[2][0])} test")
    for arch in cfg.archs:
      init, apply_fn = _network(arch, cfg, shape, n_out)
      kernel_fn = jax.jit(lambda p, x, f=apply_fn: psgd.neural_path_kernel(f, p, x))
      k_value, k_gate = jax.random.split(jax.random.key(cfg.seed))
      value0, gate0 = init(k_value), init(k_gate)
      trained_relu = None
      for variant in cfg.variants:
        gate = {"relu": value0, "flnpf": trained_relu, "frnpf-ii": gate0, "frnpf-di": gate0,
                "decoupled": gate0}[variant]
        value = gate0 if variant == "frnpf-di" else value0
        best = None
        for lr in cfg.lr_grid:
          result, v, g = _train(variant, apply_fn, value, gate, lr, data, cfg, kernel_fn, log)
          result.update(dataset=name, arch=arch)
          runs.append(result)
          finite = np.isfinite(result["val_error"])
          if finite and (best is None or result["val_error"] < best[0]["val_error"]):
            best = (result, v, g)
        if best is None:
          continue
        if variant == "relu":
          trained_relu = best[1]
        fixed = None
        if variant in ("flnpf", "frnpf-ii", "frnpf-di"):
          fixed = alignment(kernel_fn(gate, data[-1][0]), data[-1][1], n_out)
        summary.append({"dataset": name, "arch": arch, "variant": variant, "lr": best[0]["lr"],
                        "test_accuracy": best[0]["test_accuracy"],
                        "test_accuracy_hard_gates": best[0].get("test_accuracy_hard_gates"),
                        "alignment": best[0]["curves"]["alignment"],
                        "frozen_gate_alignment": fixed})
  results = {"config": dataclasses.asdict(cfg), "runs": runs, "summary": summary,
             "reference": {f"{d}/{a}": v for (d, a), v in REFERENCE.items()},
             "environment": common.environment(), "wall_time_s": time.time() - start}
  results["table"] = format_npk(results)
  os.makedirs(cfg.out, exist_ok=True)
  plotting.save_figure(plot_npk(results), os.path.join(cfg.out, "npk.png"))
  results["figures"] = ["npk.png"]
  common.write_json(os.path.join(cfg.out, "results.json"), results)
  log(results["table"])
  log(f"Wall time {results['wall_time_s']:.0f}s; wrote {os.path.join(cfg.out, 'results.json')}"
      f" and npk.png")
  return results


def format_npk(results: dict) -> str:
  rows = []
  for s in results["summary"]:
    hard = s.get("test_accuracy_hard_gates")
    align = s["alignment"]
    first = next((a for a in align if a is not None), None)
    last = next((a for a in reversed(align) if a is not None), s.get("frozen_gate_alignment"))
    rows.append([s["dataset"], s["arch"], s["variant"], common.lr_label(s["lr"]),
                 f"{100 * s['test_accuracy']:.2f}", "-" if hard is None else f"{100 * hard:.2f}",
                 common.fmt(first, ".3f"), common.fmt(last, ".3f")])
  return common.table(["dataset", "arch", "variant", "lr", "test acc %", "hard gates %",
                       "align start", "align end"], rows)


def plot_npk(results: dict):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  groups = []
  for s in results["summary"]:
    if (s["dataset"], s["arch"]) not in groups:
      groups.append((s["dataset"], s["arch"]))
  fig, axes = plt.subplots(2, max(1, len(groups)), figsize=(4.2 * max(1, len(groups)), 6.5),
                           squeeze=False)
  for col, (name, arch) in enumerate(groups):
    ax, bar = axes[0, col], axes[1, col]
    rows = [s for s in results["summary"] if (s["dataset"], s["arch"]) == (name, arch)]
    for s in rows:
      align = s["alignment"]
      if any(a is not None for a in align):
        ax.plot(range(len(align)), align, marker="o", ms=3,
                label=s["variant"] + (" (gate net)" if s["variant"] == "decoupled" else ""))
      elif s.get("frozen_gate_alignment") is not None:
        ax.axhline(s["frozen_gate_alignment"], ls=":", lw=1, color="gray")
    ax.set_title(f"{name} / {arch}: NPK-label alignment")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)
    bar.bar([s["variant"] for s in rows], [100 * s["test_accuracy"] for s in rows],
            color="tab:blue")
    accs = [100 * s["test_accuracy"] for s in rows]
    bar.set_ylim(max(0.0, min(accs) - 5), min(100.0, max(accs) + 2))
    bar.set_ylabel("test accuracy %")
    bar.tick_params(axis="x", labelsize=7)
  fig.tight_layout()
  return fig


def add_arguments(parser: argparse.ArgumentParser) -> None:
  d = NPKConfig()
  parser.add_argument("--dataset", nargs="+", default=list(d.datasets),
                      help="mnist5k (embedded, default), fashion_mnist, digits, mnist")
  parser.add_argument("--data-dir", default=None, metavar="DIR")
  parser.add_argument("--archs", nargs="+", choices=ARCHS, default=list(d.archs))
  parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(d.variants))
  parser.add_argument("--width", type=int, default=d.width)
  parser.add_argument("--depth", type=int, default=d.depth)
  parser.add_argument("--channels", nargs="+", type=int, default=list(d.channels))
  parser.add_argument("--cnn-input-pool", type=int, default=d.cnn_input_pool,
                      help="average-pool the image by this factor before the CNN (default 2)")
  parser.add_argument("--epochs", type=int, default=d.epochs)
  parser.add_argument("--batch-size", type=int, default=d.batch_size)
  parser.add_argument("--lr-grid", nargs="+", type=float, default=list(d.lr_grid))
  parser.add_argument("--momentum", type=float, default=d.momentum)
  parser.add_argument("--beta", type=float, default=d.beta, help="soft-gate sharpness β")
  parser.add_argument("--epsilon", type=float, default=d.epsilon, help="soft-gate ε")
  parser.add_argument("--kernel-examples", type=int, default=d.kernel_examples)
  parser.add_argument("--train-subset", type=int, default=None, metavar="N")
  parser.add_argument("--test-subset", type=int, default=None, metavar="N")
  parser.add_argument("--seed", type=int, default=d.seed)
  parser.add_argument("--out", default=d.out, help="output directory (default: %(default)s)")
  parser.add_argument("--quiet", action="store_true", help="no per-run log lines")


def config_from_args(args: argparse.Namespace) -> NPKConfig:
  return NPKConfig(
      datasets=tuple(args.dataset), data_dir=args.data_dir, archs=tuple(args.archs),
      variants=tuple(args.variants), width=args.width, depth=args.depth,
      channels=tuple(args.channels), cnn_input_pool=args.cnn_input_pool, epochs=args.epochs,
      batch_size=args.batch_size,
      lr_grid=tuple(args.lr_grid), momentum=args.momentum, beta=args.beta,
      epsilon=args.epsilon, kernel_examples=args.kernel_examples,
      train_subset=args.train_subset, test_subset=args.test_subset, seed=args.seed,
      out=args.out)
