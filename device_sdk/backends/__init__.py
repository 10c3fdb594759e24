"""Training backends: how the bi-level update computes its losses and gradients.

``pytorch`` (the default) differentiates the eager model with autograd (:mod:`device_sdk.train`); ``executorch``
runs an exported ExecuTorch training program (:mod:`device_sdk.backends.executorch`). Optimizers, schedule,
checkpoints and the shared tensors are the same SDK code for both.
"""

#: The training backends of :class:`device_sdk.config.TrainConfig`.
BACKENDS = ("pytorch", "executorch")
