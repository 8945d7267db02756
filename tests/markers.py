"""Marker comments ``# @name`` on the lines of a test file that an error message must name.

Error tests mark the offending line of user code with ``# @name`` and assert that the message
holds ``<file>:<that line>`` (not followed by another digit, so line 12 is not read as 123).
"""

from __future__ import annotations

import os
import re


class Markers:
    """The ``# @name`` markers of one test file: ``Markers(__file__)``."""

    def __init__(self, path: str):
        self.file = os.path.basename(path)
        with open(path, encoding="utf-8") as f:
            self.lines = {m.group(1): number for number, line in enumerate(f, 1)
                          for m in [re.search(r"# @(\w+)$", line.rstrip())] if m}

    def pattern(self, marker: str) -> re.Pattern:
        """``<file>:<line of marker>`` as a regular expression."""
        return re.compile(re.escape(f"{self.file}:{self.lines[marker]}") + r"(?!\d)")

    def assert_points_at(self, msg: str, marker: str) -> None:
        assert self.pattern(marker).search(msg), (self.file, self.lines[marker], msg)


def first_quoted(msg: str) -> str | None:
    """The first backquoted name of a message (the primitive it reports)."""
    found = re.search(r"`([^`]+)`", msg)
    return found and found.group(1)
