"""Paper-style figures from a ``results.json`` dictionary.

:func:`plot_paper` draws exactly the curves stored in the results (no recomputation), so a
figure can be re-made from a saved ``results.json``::

    import json; from pathsgd_jax.experiments.plotting import plot_paper
    plot_paper(json.load(open("runs/paper/results.json"))).savefig("paper.png", dpi=150)
"""

from __future__ import annotations

from typing import Any

from pathsgd_jax.experiments import optimizers

_COLORS = {
    "sgd": "tab:blue",
    "sgd-momentum": "tab:cyan",
    "adagrad": "tab:green",
    "adam": "tab:purple",
    "path-sgd": "tab:red",
    "path-sgd-momentum": "tab:orange",
}
_STYLES = {"sgd-momentum": "--", "path-sgd-momentum": "--"}

_DATASET_TITLES = {"mnist5k": "MNIST (5k subset)", "digits": "Digits 8x8",
                   "fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10",
                   "cifar100": "CIFAR-100", "svhn": "SVHN"}


def panel_columns(results: dict) -> list[tuple[str, str]]:
  """The ``(dataset, init)`` pairs, one figure column each, in run order."""
  cols = []
  for run in results["runs"]:
    key = (run["dataset"], run["init"])
    if key not in cols:
      cols.append(key)
  return cols


def plot_paper(results: dict[str, Any]):
  """Training loss (log scale, top row) and test error (bottom row) against epochs.

  One column per data set x initialisation, one line per optimizer (its run with the chosen
  learning rate, labelled with it). Each line's data are ``run["curves"]["epoch"]`` against
  ``run["curves"]["train_loss"]`` / ``["test_error"]`` of ``results["runs"]``; epochs after
  a divergence (``None``) are left out. Returns the matplotlib ``Figure``.
  """
  # A bare Figure (no pyplot): no GUI backend, no global state, safe in threads and tests.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  cols = panel_columns(results)
  fig = Figure(figsize=(3.6 * max(len(cols), 1) + 0.4, 6.2), layout="constrained")
  axes = fig.subplots(2, max(len(cols), 1), squeeze=False)
  handles = {}
  for c, (dataset, init) in enumerate(cols):
    ax_loss, ax_err = axes[0, c], axes[1, c]
    for run in results["runs"]:
      if (run["dataset"], run["init"]) != (dataset, init):
        continue
      opt = run["optimizer"]
      curves = run["curves"]
      lr = run["chosen_lr"]
      label = optimizers.LABELS.get(opt, opt) + (
          " (diverged)" if lr is None else f" (lr {lr:.0e})")
      for ax, key in ((ax_loss, "train_loss"), (ax_err, "test_error")):
        pts = [(e, v) for e, v in zip(curves["epoch"], curves[key]) if v is not None]
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        (line,) = ax.plot(xs, ys, label=label, color=_COLORS.get(opt),
                          linestyle=_STYLES.get(opt, "-"), marker="o", markersize=3,
                          gid=f"{dataset}/{init}/{opt}/{key}")
        handles.setdefault(opt, line)
    title = f"{_DATASET_TITLES.get(dataset, dataset)}, {init}"
    ax_loss.set_title(title, fontsize=10)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("training loss (cross-entropy)")
    ax_err.set_ylabel("test error")
    ax_err.set_xlabel("epoch")
    for ax in (ax_loss, ax_err):
      ax.grid(True, which="both", alpha=0.3)
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend(fontsize=7, loc="upper right")
  # Columns of the same data set share their y-limits, so initialisations compare at a glance.
  for dataset in {d for d, _ in cols}:
    same = [c for c, (d, _) in enumerate(cols) if d == dataset]
    for row in range(2):
      lims = [axes[row, c].get_ylim() for c in same]
      lo, hi = min(l[0] for l in lims), max(l[1] for l in lims)
      for c in same:
        axes[row, c].set_ylim(lo, hi)
  cfg = results.get("config", {})
  fig.suptitle(f"Path-SGD vs baselines: {cfg.get('depth', '?')} x {cfg.get('width', '?')} ReLU "
               f"MLP, batch {cfg.get('batch_size', '?')}, dropout {cfg.get('dropout', 0)}, "
               f"lr chosen by {cfg.get('select_by', 'val_error')}", fontsize=10)
  return fig


def save_figure(fig, path: str, dpi: int = 150) -> None:
  """Saves ``fig`` (format from the extension)."""
  fig.savefig(path, dpi=dpi)
