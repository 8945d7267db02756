"""The ``pathsgd-jax`` command line (also ``python -m pathsgd_jax``).

``pathsgd-jax paper``  the feed-forward comparison of the Path-SGD paper, with figures.
``pathsgd-jax bench``  step time and memory of path_sgd vs optax.sgd / optax.adagrad.

Every subcommand writes ``OUT/results.json`` (configuration, curves or timings, package
versions and devices) and PNG figures, and prints a summary table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence

from pathsgd_jax.experiments import optimizers

# Defaults of ``paper`` without arguments, and of ``--preset paper``. Explicit options win.
PAPER_DEFAULTS = dict(dataset=["mnist5k"], width=1000, depth=2, epochs=10, batch_size=100,
                      optimizers=["sgd", "adagrad", "adam", "path-sgd"],
                      init=["balanced", "unbalanced"], lr_grid=None)
PAPER_PRESET = dict(dataset=["mnist5k"], width=4000, depth=2, epochs=20, batch_size=100,
                    optimizers=["sgd", "adagrad", "path-sgd"],
                    init=["balanced", "unbalanced"], lr_grid=list(optimizers.PAPER_GRID))

_GRID_TEXT = "\n".join(f"  {k:>18}: {', '.join(f'{v:g}' for v in g)}"
                       for k, g in optimizers.DEFAULT_GRIDS.items())

PAPER_DESCRIPTION = f"""\
The feed-forward experiment of the Path-SGD paper (Neyshabur, Salakhutdinov & Srebro,
NIPS 2015): a fully connected ReLU MLP trained with softmax cross-entropy by SGD, AdaGrad,
Adam and Path-SGD (plus optional momentum-0.9 variants), from a balanced initialisation
(N(0, 1/fan_in), zero biases) and an unbalanced one (the same network after random node
rescalings of h/4 units per layer by 10*exp(z): the same function). The factors are rounded
to powers of two by default, which makes the two starts the same function exactly in
floating point (--no-unbalance-power-of-two: the paper's continuous factors, equal up to
rounding, which training amplifies).

Without arguments it runs the default job on the embedded MNIST subset (mnist5k: 4,000
train / 1,000 test real digits; 10% of train held out for validation): a 2 x 1000 MLP, batch
100, 10 epochs, optimizers sgd adagrad adam path-sgd, both initialisations, the default
per-optimizer grids below (14 learning rates x 2 initialisations = 28 runs; about 1 minute
on an unloaded 2-core CPU).

Learning rate: for each optimizer x initialisation every grid value is trained for the full
--epochs (the selection budget equals the reported one) and the one with the lowest final
validation error (--select-by) is kept; NaN/inf runs are discarded; the chosen grid run's
curves are reported (no retraining). The table printed after the main one selects by final
training loss instead (secondary, for diagnosis). Default grids, per-optimizer sub-grids of
the paper's grid 10^-a:
{_GRID_TEXT}
--lr-grid gives one grid for all optimizers, --lr-grids per-optimizer grids, --preset paper
the paper's full grid a = 0..10.

Curves per epoch: training loss = cross-entropy on the whole training split (validation part
excluded) evaluated at the end of the epoch with the deterministic network (no dropout);
also stored: the epoch's mean mini-batch loss, validation and test loss/error. All runs see
the same mini-batch order and dropout masks. Path-SGD's path network (its kappa, recomputed
every step inside the compiled step) never uses dropout; with --dropout only the training
loss does.

Outputs in --out (default runs/paper): results.json, paper.png (training loss, log scale,
and test error against epochs; one column per data set x initialisation, one line per
optimizer), paper.pdf with --pdf.

--preset paper: 2 x 4000 MLP, full grid 10^-a (a = 0..10), sgd adagrad path-sgd, both
initialisations, 20 epochs (our choice; pass --epochs), on --dataset (default mnist5k; the
paper used MNIST, CIFAR-10, CIFAR-100 and SVHN, which need --data-dir). Meant for an
accelerator: on a CPU it takes hours.
"""

BENCH_DESCRIPTION = """\
Step time, compile time and compiled memory of pathsgd_jax.path_sgd (momentum 0.9) against
optax.sgd (momentum 0.9), optax.adagrad and optax.adam, each a jitted, donating train step
(softmax cross-entropy) on a fixed random batch. Networks: the paper's MLP (--mlp-sizes,
default 784-4000-4000-10), a small CIFAR-style CNN (conv3x3 32 -> relu -> avgpool2 ->
conv3x3 64 -> relu -> avgpool2 -> dense 10 on 32x32x3), batch --batch (100), and ResNet v1.5
resnet18/34/50/101/152 with eval-mode BatchNorm (--resnet-image-size, --resnet-batch). Path-SGD
is run with each --refresh-every k (default 1 and 10: kappa recomputed every k-th step, cached
in between). Compile time is split into trace (tracing and lowering, Python) and XLA compile;
--repeats 0 reports compile time and memory only (deep ResNets on a CPU).

Timing: variants interleaved in one process, order rotated each repeat; each repeat times
--number consecutive steps (default: lcm of the refresh periods, so refresh steps count at
their true frequency); median over --repeats repeats after --warmup untimed ones. Memory:
XLA's compiled memory analysis per step (arguments + outputs - aliased + temporaries, an
estimate of the step's peak); device memory statistics where the backend has them (not on
CPU). Outputs in --out (default runs/bench): results.json, bench.png; prints a table with
the ratios to SGD: of the medians, paired (median over repeats of the within-repeat ratio)
and of the fastest repeats; the last two are the ones to trust on a machine shared with
other jobs.
"""


def _positive_int(text: str) -> int:
  v = int(text)
  if v < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
  return v


def _opt_grid(text: str) -> tuple[str, list[float]]:
  name, sep, values = text.partition("=")
  if not sep or name not in optimizers.OPTIMIZERS:
    raise argparse.ArgumentTypeError(
        f"expected OPT=LR,LR,... with OPT in {', '.join(optimizers.OPTIMIZERS)}, got {text!r}")
  try:
    grid = [float(v) for v in values.split(",") if v]
  except ValueError as e:
    raise argparse.ArgumentTypeError(f"bad learning rate in {text!r}: {e}") from e
  if not grid:
    raise argparse.ArgumentTypeError(f"no learning rate given in {text!r}")
  return name, grid


def _add_common(p: argparse.ArgumentParser, default_out: str) -> None:
  p.add_argument("--out", default=default_out, metavar="DIR",
                 help=f"output directory for results.json and figures (default {default_out})")
  p.add_argument("--quiet", action="store_true", help="no progress bars or per-run log lines")
  p.add_argument("--dpi", type=int, default=150, help="figure resolution (default 150)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="pathsgd-jax",
      description="Experiments of pathsgd_jax: Path-SGD (path-normalised SGD) for JAX/Optax.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Run 'pathsgd-jax SUBCOMMAND --help' for the options of each subcommand.")
  sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
  sub.required = True

  p = sub.add_parser("paper", help="the paper's MLP comparison (SGD/AdaGrad/Adam/Path-SGD)",
                     description=PAPER_DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", choices=["default", "paper"], default="default",
                 help="'paper': 2x4000 MLP, full grid 10^-0..10^-10, sgd/adagrad/path-sgd, "
                      "20 epochs; explicit options override it (default: 'default')")
  p.add_argument("--dataset", nargs="+", metavar="NAME",
                 help="data set(s): mnist5k (embedded), digits, fashion_mnist, mnist, cifar10, "
                      "cifar100, svhn (default mnist5k)")
  p.add_argument("--data-dir", metavar="DIR",
                 help="directory with the data files (mnist, cifar10, cifar100, svhn; "
                      "fashion_mnist is also found where Debian's dataset-fashion-mnist "
                      "installs it)")
  p.add_argument("--width", type=_positive_int, help="hidden units per layer (default 1000)")
  p.add_argument("--depth", type=_positive_int, help="number of hidden layers (default 2)")
  p.add_argument("--epochs", type=_positive_int, help="training epochs (default 10)")
  p.add_argument("--batch-size", type=_positive_int, help="mini-batch size (default 100)")
  p.add_argument("--optimizers", nargs="+", choices=optimizers.OPTIMIZERS, metavar="OPT",
                 help=f"optimizers among {', '.join(optimizers.OPTIMIZERS)} "
                      "(default: sgd adagrad adam path-sgd); momentum variants use 0.9")
  p.add_argument("--init", nargs="+", choices=["balanced", "unbalanced"],
                 help="initialisations (default: balanced unbalanced)")
  p.add_argument("--unbalance-power-of-two", action=argparse.BooleanOptionalAction,
                 default=True,
                 help="round each unit's unbalancing factor 10 exp(z) to the nearest power of "
                      "two, so the unbalanced start is the balanced network's function exactly "
                      "in floating point and rounding noise does not separate the two starts "
                      "(default); --no-unbalance-power-of-two keeps the paper's continuous "
                      "factors")
  p.add_argument("--lr-grid", nargs="+", type=float, metavar="LR",
                 help="one learning-rate grid for every optimizer (default: per-optimizer "
                      "sub-grids, see above)")
  p.add_argument("--lr-grids", nargs="+", type=_opt_grid, metavar="OPT=LR,LR,...",
                 help="per-optimizer grids, e.g. path-sgd=0.03,0.01,0.003 adam=0.001,0.0003; "
                      "they override --lr-grid and the defaults for the optimizers named")
  p.add_argument("--dropout", type=float, default=0.0, metavar="RATE",
                 help="dropout rate on hidden activations in the training loss (default 0)")
  p.add_argument("--seed", type=int, default=0, help="seed of initialisation, validation "
                 "split, batch order and dropout (default 0)")
  p.add_argument("--val-fraction", type=float, default=0.1,
                 help="fraction of the training set held out for validation (default 0.1)")
  p.add_argument("--select-by", choices=["val_error", "val_loss", "train_loss"],
                 default="val_error",
                 help="learning-rate selection criterion, final value after --epochs "
                      "(default val_error, as in the paper)")
  p.add_argument("--momentum", type=float, default=optimizers.MOMENTUM,
                 help="momentum of the *-momentum optimizers (default 0.9)")
  p.add_argument("--train-subset", type=_positive_int, metavar="N",
                 help="use only N training examples (quick checks)")
  p.add_argument("--test-subset", type=_positive_int, metavar="N",
                 help="use only N test examples (quick checks)")
  p.add_argument("--steps-per-call", type=_positive_int, default=50,
                 help="optimizer steps per compiled call (lax.scan); the largest divisor of "
                      "the steps per epoch not above it is used (default 50)")
  p.add_argument("--pdf", action="store_true", help="also save paper.pdf")
  _add_common(p, os.path.join("runs", "paper"))

  b = sub.add_parser("bench", help="step time and memory of path_sgd vs optax.sgd/adagrad",
                     description=BENCH_DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  b.add_argument("--networks", "--network", nargs="+",
                 choices=["mlp", "cnn", "resnet18", "resnet34", "resnet50", "resnet101",
                          "resnet152"], default=["mlp", "cnn"],
                 help="networks to benchmark (default: mlp cnn); resnetN: ResNet v1.5 with "
                      "eval-mode BatchNorm, at --resnet-image-size and --resnet-batch")
  b.add_argument("--resnet-image-size", type=_positive_int, default=32,
                 help="ResNet input height = width (default 32: CIFAR-style stem)")
  b.add_argument("--resnet-batch", type=_positive_int, default=2,
                 help="ResNet batch size (default 2)")
  b.add_argument("--mlp-sizes", nargs="+", type=_positive_int, default=[784, 4000, 4000, 10],
                 metavar="N", help="MLP layer sizes (default 784 4000 4000 10)")
  b.add_argument("--cnn-channels", nargs="+", type=_positive_int, default=[32, 64],
                 metavar="C", help="CNN conv channels (default 32 64)")
  b.add_argument("--image-size", type=_positive_int, default=32,
                 help="CNN input height = width (default 32)")
  b.add_argument("--image-channels", type=_positive_int, default=3,
                 help="CNN input channels (default 3)")
  b.add_argument("--batch", type=_positive_int, default=100, help="batch size (default 100)")
  b.add_argument("--refresh-every", nargs="+", type=_positive_int, default=[1, 10],
                 metavar="K", help="Path-SGD kappa refresh periods to compare (default 1 10)")
  b.add_argument("--ddp-alphas", nargs="+", type=float, default=[], metavar="A",
                 help="also time ddp_sgd (momentum 0.9) at these alphas, e.g. 0.5 1 (default none)")
  b.add_argument("--repeats", type=int, default=30,
                 help="timed repeats per variant (default 30; 0: compile time and memory only)")
  b.add_argument("--warmup", type=int, default=2, help="untimed repeats first (default 2)")
  b.add_argument("--number", type=_positive_int,
                 help="steps per timed repeat (default: lcm of --refresh-every)")
  b.add_argument("--seed", type=int, default=0, help="seed of parameters and batch")
  _add_common(b, os.path.join("runs", "bench"))
  from pathsgd_jax.experiments import depth, rnn  # pylint: disable=g-import-not-at-top

  p = sub.add_parser("rnn", help="ReLU RNNs on the adding problem / sequential MNIST",
                     description=rnn.DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  rnn.add_arguments(p)
  p = sub.add_parser("depth", help="one learning rate across depths: raw vs normalised κ",
                     description=depth.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  depth.add_arguments(p)
  from pathsgd_jax.experiments import mpo  # pylint: disable=g-import-not-at-top
  p = sub.add_parser("mpo", help="MPO-compressed FC2 / LeNet-5: accuracy vs compression",
                     description=mpo.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  mpo.add_arguments(p)
  from pathsgd_jax.experiments import gsm  # pylint: disable=g-import-not-at-top
  p = sub.add_parser("gsm", help="pruning while training: GSM vs Path-GSM vs magnitude",
                     description=gsm.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  gsm.add_arguments(p)
  from pathsgd_jax.experiments import resnet  # pylint: disable=g-import-not-at-top
  p = sub.add_parser("resnet", help="BatchNorm ResNet: SGD+m, Path-SGD+m (train-mode BN), Adam",
                     description=resnet.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  resnet.add_arguments(p)
  from pathsgd_jax.experiments import lr  # pylint: disable=g-import-not-at-top
  p = sub.add_parser("lr", help="suggest_learning_rate on the model gallery against grids",
                     description=lr.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  lr.add_arguments(p)
  from pathsgd_jax.experiments import ddp  # pylint: disable=g-import-not-at-top
  p = sub.add_parser("ddp", help="DDP-SGD (alpha 0, 0.5, 1) vs SGD, SGD+BatchNorm, Path-SGD, "
                     "Adam", description=ddp.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  ddp.add_arguments(p)
  from pathsgd_jax.experiments import npk  # pylint: disable=g-import-not-at-top
  p = sub.add_parser("npk", help="gates vs weights: ReLU vs deep gated networks, NPK alignment",
                     description=npk.__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  npk.add_arguments(p)
  return parser


def _log_fn(quiet: bool):
  if quiet:
    return lambda *a, **k: None
  return lambda msg: print(msg, flush=True)


def _paper(args: argparse.Namespace) -> int:
  from pathsgd_jax.experiments import common, paper, plotting  # pylint: disable=g-import-not-at-top

  base = PAPER_PRESET if args.preset == "paper" else PAPER_DEFAULTS
  pick = lambda name: getattr(args, name) if getattr(args, name) is not None else base[name]
  cfg = paper.PaperConfig(
      datasets=pick("dataset"), data_dir=args.data_dir, width=pick("width"),
      depth=pick("depth"), epochs=pick("epochs"), batch_size=pick("batch_size"),
      optimizers=pick("optimizers"), inits=pick("init"), lr_grid=pick("lr_grid"),
      lr_grids=dict(args.lr_grids) if args.lr_grids else None,
      dropout=args.dropout, seed=args.seed, val_fraction=args.val_fraction,
      select_by=args.select_by, momentum=args.momentum, train_subset=args.train_subset,
      test_subset=args.test_subset, steps_per_call=args.steps_per_call, preset=args.preset,
      unbalance_power_of_two=args.unbalance_power_of_two)
  log = _log_fn(args.quiet)
  progress = not args.quiet and sys.stderr.isatty()
  results = paper.run_paper(cfg, progress=progress, log=log)
  results["argv"] = sys.argv[1:]
  results["command_line"] = "pathsgd-jax " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  os.makedirs(args.out, exist_ok=True)
  fig = plotting.plot_paper(results)
  figures = ["paper.png"] + (["paper.pdf"] if args.pdf else [])
  for name in figures:
    plotting.save_figure(fig, os.path.join(args.out, name), dpi=args.dpi)
  results["figures"] = figures
  common.write_json(os.path.join(args.out, "results.json"), results)
  print()
  print(f"Learning rate selected by final {cfg.select_by} after {cfg.epochs} epochs; final "
        "training loss on the whole training split:")
  print(paper.format_summary(results["summary"]))
  if cfg.select_by != "train_loss":
    print()
    print("Secondary (diagnostic): learning rate selected by final training loss instead:")
    print(paper.format_summary(results["summary_by_train_loss"]))
  print()
  print(f"Total wall time {results['wall_time_s']:.1f}s. Wrote "
        f"{os.path.join(args.out, 'results.json')} and "
        f"{', '.join(os.path.join(args.out, f) for f in figures)}")
  return 0


def _bench(args: argparse.Namespace) -> int:
  from pathsgd_jax.experiments import bench, common, plotting  # pylint: disable=g-import-not-at-top

  cfg = bench.BenchConfig(
      networks=args.networks, mlp_sizes=args.mlp_sizes, cnn_channels=args.cnn_channels,
      image_size=args.image_size, image_channels=args.image_channels, batch=args.batch,
      refresh_every=args.refresh_every, ddp_alphas=args.ddp_alphas, repeats=args.repeats,
      resnet_image_size=args.resnet_image_size, resnet_batch=args.resnet_batch,
      warmup=args.warmup,
      number=args.number, seed=args.seed)
  results = bench.run_bench(cfg, log=_log_fn(args.quiet))
  results["argv"] = sys.argv[1:]
  os.makedirs(args.out, exist_ok=True)
  plotting.save_figure(bench.plot_bench(results), os.path.join(args.out, "bench.png"),
                       dpi=args.dpi)
  results["figures"] = ["bench.png"]
  common.write_json(os.path.join(args.out, "results.json"), results)
  print()
  print(f"Backend {results['environment']['jax_backend']} "
        f"({', '.join(results['environment']['devices'])}); medians over {cfg.repeats} "
        "interleaved repeats of --number steps. Ratios to optax.sgd (momentum 0.9): t/sgd = "
        "ratio of medians, t/sgd paired = median over repeats of the within-repeat ratio, "
        "t/sgd min = ratio of the fastest repeats (the last two resist a shared machine); "
        "mem/sgd = ratio of compiled peak estimates:")
  print(bench.format_bench(results))
  stats = results.get("device_memory_stats")
  if stats:
    print("Device memory statistics (process-wide): " + ", ".join(
        f"{k}={v}" for k, v in stats.items() if "bytes" in k))
  else:
    print("Device memory statistics: not available on this backend (compiled estimates "
          "above).")
  print(f"Wrote {os.path.join(args.out, 'results.json')} and "
        f"{os.path.join(args.out, 'bench.png')} ({results['wall_time_s']:.1f}s)")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``pathsgd-jax`` console script."""
  parser = build_parser()
  args = parser.parse_args(argv)
  from pathsgd_jax.data import DatasetNotFoundError, MalformedDatasetError  # pylint: disable=g-import-not-at-top
  from pathsgd_jax.experiments.common import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    if args.command == "paper":
      return _paper(args)
    if args.command == "rnn":
      from pathsgd_jax.experiments import rnn  # pylint: disable=g-import-not-at-top
      args.argv = list(sys.argv[2:] if argv is None else argv[1:])
      rnn.run(args)
      return 0
    if args.command == "gsm":
      from pathsgd_jax.experiments import gsm  # pylint: disable=g-import-not-at-top
      gsm.run_gsm(gsm.config_from_args(args), log=_log_fn(args.quiet))
      return 0
    if args.command == "resnet":
      from pathsgd_jax.experiments import resnet  # pylint: disable=g-import-not-at-top
      resnet.run_resnet(resnet.config_from_args(args), log=_log_fn(args.quiet))
      return 0
    if args.command == "mpo":
      from pathsgd_jax.experiments import mpo  # pylint: disable=g-import-not-at-top
      mpo.run_mpo(mpo.config_from_args(args), log=_log_fn(args.quiet))
      return 0
    if args.command == "lr":
      from pathsgd_jax.experiments import lr  # pylint: disable=g-import-not-at-top
      lr.run_lr(lr.config_from_args(args), log=_log_fn(args.quiet), merge=args.merge)
      return 0
    if args.command == "ddp":
      from pathsgd_jax.experiments import ddp  # pylint: disable=g-import-not-at-top
      ddp.run_ddp(ddp.config_from_args(args), log=_log_fn(args.quiet))
      return 0
    if args.command == "npk":
      from pathsgd_jax.experiments import npk  # pylint: disable=g-import-not-at-top
      npk.run_npk(npk.config_from_args(args), log=_log_fn(args.quiet))
      return 0
    if args.command == "depth":
      from pathsgd_jax.experiments import depth  # pylint: disable=g-import-not-at-top
      depth.run_depth(depth.config_from_args(args))
      return 0
    return _bench(args)
  except (DatasetNotFoundError, MalformedDatasetError, ConfigError) as e:
    print(f"pathsgd-jax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
