"""Finding dataset files on disk: explicit directory, environment variable, system paths."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Sequence

from pathsgd_jax.data.errors import DatasetNotFoundError

#: Environment variable naming one or more (``os.pathsep``-separated) data directories.
DATA_DIR_ENV = "PATHSGD_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class FileSet:
  """Where and under which names the files of one dataset are looked for.

  Attributes:
    title: Human-readable dataset name used in messages.
    files: One entry per required file: the accepted names for it, preferred name first.
    subdirs: Sub-directories of a data directory that may hold the files.
    system_dirs: Directories below each system ``share`` directory (``/usr/share``,
      ``/usr/local/share``, ...) that may hold the files.
    how_to_get: Sentence(s) telling the user how to obtain the files.
  """

  title: str
  files: tuple[tuple[str, ...], ...]
  subdirs: tuple[str, ...]
  system_dirs: tuple[str, ...]
  how_to_get: str


def _share_dirs() -> list[Path]:
  """System and user ``share`` directories, in search order."""
  dirs = [Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))]
  dirs += [Path(d) for d in os.environ.get("XDG_DATA_DIRS", "").split(os.pathsep) if d]
  dirs += [Path(sys.prefix) / "share", Path("/usr/local/share"), Path("/usr/share")]
  return dirs


def candidate_dirs(fileset: FileSet, data_dir: str | os.PathLike[str] | None) -> list[Path]:
  """Directories searched for ``fileset``, in order, without duplicates.

  With ``data_dir`` given only that directory (and its dataset sub-directories) is searched,
  so an explicit choice never silently falls back to another copy. Without it, the
  directories named by ``$PATHSGD_DATA_DIR`` come first, then the system ``share``
  directories where distribution packages install datasets.

  Args:
    fileset: The dataset's file description.
    data_dir: Explicit directory or ``None``.

  Returns:
    The list of directories (existing or not).
  """
  roots: list[Path]
  if data_dir is not None:
    roots = [Path(data_dir).expanduser()]
  else:
    env = os.environ.get(DATA_DIR_ENV, "")
    roots = [Path(d).expanduser() for d in env.split(os.pathsep) if d]
  dirs: list[Path] = []
  for root in roots:
    dirs += [root / sub for sub in fileset.subdirs] + [root]
  if data_dir is None:
    for share in _share_dirs():
      dirs += [share / sub for sub in fileset.system_dirs]
  unique: list[Path] = []
  for d in dirs:
    if d not in unique:
      unique.append(d)
  return unique


def _find_in(directory: Path, names: Sequence[str]) -> Path | None:
  for name in names:
    path = directory / name
    if path.is_file():
      return path
  return None


def find_files(fileset: FileSet, data_dir: str | os.PathLike[str] | None) -> list[Path]:
  """Finds the first directory that holds every file of ``fileset``.

  Args:
    fileset: The dataset's file description.
    data_dir: Explicit directory, or ``None`` to use ``$PATHSGD_DATA_DIR`` and system paths.

  Returns:
    The paths of the files, in the order of ``fileset.files``.

  Raises:
    DatasetNotFoundError: if no candidate directory holds all files; the message lists the
      files, each directory searched with what it lacked, and how to get the files.
  """
  report = []
  for directory in candidate_dirs(fileset, data_dir):
    if not directory.is_dir():
      report.append(f"  {directory}  (no such directory)")
      continue
    found = [_find_in(directory, names) for names in fileset.files]
    if all(p is not None for p in found):
      return found  # type: ignore[return-value]
    missing = [names[0] for names, p in zip(fileset.files, found) if p is None]
    report.append(f"  {directory}  (missing: {', '.join(missing)})")
  wanted = "\n".join("  " + " or ".join(names) for names in fileset.files)
  if data_dir is not None:
    where = "data_dir only"
  else:
    env = os.environ.get(DATA_DIR_ENV) or "(unset)"
    where = f"${DATA_DIR_ENV}={env}, then system data directories"
  raise DatasetNotFoundError(
      f"{fileset.title} files not found.\nLooked for these files:\n{wanted}\n"
      f"in these directories ({where}):\n"
      + "\n".join(report) + "\n"
      f"How to get them: {fileset.how_to_get} Then pass the directory as data_dir= (or "
      f"--data-dir on the command line), or set {DATA_DIR_ENV} to a directory that holds the "
      f"files directly or in one of the sub-directories {', '.join(fileset.subdirs)}.")
