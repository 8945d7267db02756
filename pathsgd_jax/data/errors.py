"""Exceptions raised by the dataset loaders."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
  """The files of a dataset were not found in any of the searched directories.

  The message lists every file that was looked for, every directory that was searched and
  how to obtain the files.
  """


class MalformedDatasetError(ValueError):
  """A dataset file exists but its content is truncated, corrupt or inconsistent.

  The message names the file and the problem. Loaders raise this instead of returning a
  dataset that is silently shorter than, or different from, what the file declares.
  """
