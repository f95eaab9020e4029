"""The type aliases the whole package shares, so that one name means one thing everywhere.

`PyTree`: a JAX pytree, in practice a nested dict of arrays (parameters, optimizer state, gradients,
the EMA teacher). A plain alias of `Any`: JAX has no precise pytree type, and the name documents intent.

`Batch`: one step's input, a dict from field name ("input_values", "attention_mask", "labels", ...)
to an array whose leading axis is the example; NumPy on the host (what a data source yields), a
`jax.Array` once placed on devices (what a train step receives).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any
Batch = dict[str, np.ndarray | jax.Array]

__all__ = ["Batch", "PyTree"]
