"""Path-SGD for JAX: path-normalised optimisation of ReLU networks as Optax transformations.

Neyshabur, Salakhutdinov & Srebro, *Path-SGD: Path-Normalized Optimization in Deep Neural
Networks*, NIPS 2015.
"""

from pathsgd_jax import checkpoint, data, ddp, init, linen, mpo, nnx, rnn, tasks
from pathsgd_jax._errors import PathNetworkError, UnsupportedOperationError
from pathsgd_jax._pathnet import Operation
from pathsgd_jax._learning_rate import relative_step, suggest_learning_rate
from pathsgd_jax._report import LeafReport, PathStructure, StructureWarning, path_structure
from pathsgd_jax._scales import path_norm, path_scales
from pathsgd_jax.npk import (SoftGates, gated, neural_path_features, neural_path_kernel,
                             neural_path_value)
from pathsgd_jax.init import balanced_init, unbalanced_init
from pathsgd_jax._transform import ScaleByPathNormState, path_sgd, scale_by_path_norm
from pathsgd_jax.ddp import ScaleByDDPState, ddp_scales, ddp_sgd, scale_by_ddp
from pathsgd_jax.gsm import (GlobalSparseMomentumState, LeafSparsity, SparsityReport,
                              active_count, global_sparse_momentum, path_gsm,
                              prune_to_compression, saliency_mask, sparsity_report)

__version__ = "0.1.0"


def __getattr__(name):
  # `pathsgd_jax.equinox` needs the optional extra `equinox`: imported on first use.
  if name == "equinox":
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module("pathsgd_jax.equinox")
  raise AttributeError(f"module 'pathsgd_jax' has no attribute {name!r}")

__all__ = (
    "ScaleByDDPState",
    "ddp",
    "ddp_scales",
    "ddp_sgd",
    "scale_by_ddp",
    "GlobalSparseMomentumState",
    "LeafReport",
    "LeafSparsity",
    "Operation",
    "PathNetworkError",
    "PathStructure",
    "ScaleByPathNormState",
    "SoftGates",
    "SparsityReport",
    "StructureWarning",
    "UnsupportedOperationError",
    "active_count",
    "balanced_init",
    "checkpoint",
    "data",
    "gated",
    "global_sparse_momentum",
    "init",
    "linen",
    "mpo",
    "neural_path_features",
    "neural_path_kernel",
    "neural_path_value",
    "nnx",
    "path_gsm",
    "path_norm",
    "path_scales",
    "path_sgd",
    "path_structure",
    "prune_to_compression",
    "relative_step",
    "rnn",
    "saliency_mask",
    "scale_by_path_norm",
    "sparsity_report",
    "suggest_learning_rate",
    "tasks",
    "unbalanced_init",
)
