"""Shared helpers of the experiments: environment record, JSON output, tables, number format."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any


class ConfigError(ValueError):
  """An invalid option or combination of options; the CLI reports it without a traceback."""


def environment() -> dict[str, Any]:
  """Versions of the numerical stack and the devices the run used."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  versions = {}
  for dist in ("pathsgd-jax", "jax", "jaxlib", "optax", "flax", "numpy", "matplotlib"):
    try:
      versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
      versions[dist] = None
  devices = jax.devices()
  return {
      "pathsgd_jax_source": _git_state(),
      "versions": versions,
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "machine": platform.machine(),
      "processor": platform.processor() or None,
      "cpu_count": os.cpu_count(),
      "jax_backend": jax.default_backend(),
      "devices": [f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip()
                  for d in devices],
      "x64": bool(jax.config.jax_enable_x64),
  }


def _git_state() -> dict[str, Any] | None:
  """Commit and dirty flag of the source tree the package runs from, if it is a git checkout."""
  import subprocess  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if not os.path.isdir(os.path.join(root, ".git")):
    return None
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "pathsgd_jax"],
                            capture_output=True, text=True, timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "dirty_files": [l[3:] for l in status.splitlines()]}


def _clean(obj: Any) -> Any:
  """Makes numpy/JAX scalars and arrays and non-finite floats JSON-friendly."""
  if isinstance(obj, dict):
    return {str(k): _clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v) for v in obj]
  if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
    return _clean(obj.tolist())
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  return obj


def write_json(path: str, data: dict) -> None:
  """Writes ``data`` as indented JSON; NaN/inf become ``null`` (strict JSON)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(_clean(data), f, indent=1, allow_nan=False)
    f.write("\n")
  os.replace(tmp, path)


def fmt(x: Any, spec: str = ".4g") -> str:
  """Formats a number, ``None``/NaN as ``-``."""
  if x is None:
    return "-"
  if isinstance(x, float) and not math.isfinite(x):
    return "nan" if x != x else ("inf" if x > 0 else "-inf")
  if isinstance(x, (int, float)):
    return format(x, spec)
  return str(x)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table with right-aligned numeric columns."""
  cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

  def line(r):
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

  sep = "  ".join("-" * w for w in widths)
  return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def lr_label(lr: float) -> str:
  """``1e-3`` style label of a learning rate."""
  if lr <= 0:
    return str(lr)
  exp = math.log10(lr)
  if abs(exp - round(exp)) < 1e-9:
    return f"1e{int(round(exp))}"
  return f"{lr:.3g}"
