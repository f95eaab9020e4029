"""The one precision policy: what every command and `from_pretrained` means by `precision`.

Why it exists: JAX's default float32 matmul and convolution precision is not float32 everywhere.
On Ampere/Hopper GPUs it is TF32 (10-bit mantissa), on TPUs bf16 passes; on CPU it is full
float32. A model that relies on the default therefore computes differently on the machine a user
trains on than on the CPU where its parity was checked (measured on an H100: 1.1-1.8e-3 relative
error at base size against 2-4e-6 at full precision). So the model never reads the global flag
`jax_default_matmul_precision`: every top-level module carries a `precision` field, and its
`__call__` traces under `jax.default_matmul_precision(...)` set from it, which stamps that
precision into every `dot_general` and convolution of the program (forward and, through the
transpose rules, backward). `tests/test_precision.py` lowers the programs and reads the
precision config back out of the StableHLO.

The policies (`--precision` on every command that computes, `precision=` in Python):

- `highest`: float32, HIGHEST matmul/conv precision (true fp32): parity checks, embeddings.
- `default`: float32 at the platform's DEFAULT precision (TF32 on GPU, bf16 passes on TPU, fp32 on
  CPU): fast fp32 training and transcription.
- `bf16`: bfloat16 compute (DEFAULT precision: bf16 inputs, fp32 accumulation): fastest training.

Parameters always stay float32; only activations and matmul inputs change.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from flax_d2v.errors import D2VError

# The value a module's `precision` field holds and `jax.default_matmul_precision` accepts.
MATMUL_PRECISIONS = ("highest", "default")


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    """A named policy: the module's compute dtype and its matmul/convolution precision."""

    name: str
    dtype: Any
    matmul: str  # one of MATMUL_PRECISIONS
    description: str

    def module_kwargs(self) -> dict[str, Any]:
        """What `Data2VecAudioModel(config, **policy.module_kwargs())` needs."""
        return {"dtype": self.dtype, "precision": self.matmul}


POLICIES: dict[str, PrecisionPolicy] = {
    "highest": PrecisionPolicy("highest", jnp.float32, "highest", "float32, HIGHEST matmul/conv precision"),
    "default": PrecisionPolicy(
        "default", jnp.float32, "default", "float32, the platform's default matmul/conv precision (TF32 on GPU)"
    ),
    "bf16": PrecisionPolicy("bf16", jnp.bfloat16, "default", "bfloat16 compute, float32 params and accumulation"),
}
NAMES = tuple(POLICIES)


def resolve(policy: str | PrecisionPolicy) -> PrecisionPolicy:
    """The policy called `policy`; one clear error naming the setting otherwise."""
    if isinstance(policy, PrecisionPolicy):
        return policy
    try:
        return POLICIES[policy]
    except KeyError:
        raise D2VError(f"precision {policy!r}: choose one of {', '.join(NAMES)}") from None


def policy_of(dtype: Any, matmul: str) -> PrecisionPolicy:
    """The policy a module's (dtype, precision) fields amount to (for reports)."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return POLICIES["bf16"]
    return POLICIES["highest" if matmul == "highest" else "default"]


def check_matmul_precision(value: str) -> str:
    if value not in MATMUL_PRECISIONS:
        raise ValueError(
            f"module precision {value!r}: choose one of {MATMUL_PRECISIONS} "
            "(the dtype is the module's `dtype` field; see flax_d2v.precision)"
        )
    return value


@contextlib.contextmanager
def matmul_precision(value: str) -> Iterator[None]:
    """Trace the body with every dot_general/convolution at `value` ("highest" or "default").

    "default" is set explicitly too, so a user's `JAX_DEFAULT_MATMUL_PRECISION` never leaks in.
    """
    with jax.default_matmul_precision(check_matmul_precision(value)):
        yield


def add_argument(parser: Any, default: str, what: str) -> None:
    """`--precision {highest,default,bf16}` for a command, with its default and why."""
    parser.add_argument(
        "--precision",
        choices=NAMES,
        default=default,
        help=f"compute precision (default {default}: {what}); highest = float32 with "
        "HIGHEST matmul/conv precision, default = float32 at the platform's default "
        "(TF32 on GPU), bf16 = bfloat16 compute with float32 params",
    )
