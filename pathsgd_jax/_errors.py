"""Exceptions raised when a network cannot be turned into an exact path network."""


class PathNetworkError(ValueError):
  """The network, its parameters or its inputs do not define a valid path network."""


class UnsupportedOperationError(PathNetworkError):
  """An operation in the network is not linear and positively homogeneous on activations.

  Path-SGD and path norms are defined for networks whose activations pass only through
  linear maps, positively homogeneous activations (ReLU, leaky ReLU) and pooling. The message
  names the primitive, the source line that produced it and what can be done about it.
  """
