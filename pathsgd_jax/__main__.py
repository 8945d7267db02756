"""``python -m pathsgd_jax``: the ``pathsgd-jax`` command line."""

import sys

from pathsgd_jax.experiments.cli import main

if __name__ == "__main__":
  sys.exit(main())
