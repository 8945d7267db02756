"""Experiments and the ``pathsgd-jax`` command line.

Subcommands (see ``pathsgd-jax --help``):

* ``paper``: the feed-forward comparison of the Path-SGD paper (SGD, AdaGrad, Adam, Path-SGD,
  optional momentum variants; balanced and unbalanced initialisations; learning rate chosen on
  a held-out validation split) with paper-style figures (:mod:`.paper`, :mod:`.plotting`).
* ``bench``: step time and compiled memory of ``path_sgd`` against ``optax.sgd`` and
  ``optax.adagrad`` on an MLP and a small CNN (:mod:`.bench`).

References:
  B. Neyshabur, R. Salakhutdinov, N. Srebro. Path-SGD: Path-Normalized Optimization in Deep
  Neural Networks. NIPS 2015, arXiv:1506.02617.
"""
