"""The positional conv's im2col + matmul form (used on GPUs) computes what cuDNN's grouped conv does.

On a GPU the positional conv runs through `modeling.grouped_conv_matmul`; CPU runs keep XLA's
convolution. These tests force the matmul form on the CPU and compare values and gradients with
the convolution, at the base model's kernel and group layout and at an even kernel (the extra
frame transformers' PadLayer drops).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_d2v import modeling
from flax_d2v.config import tiny_config

# float32 sums of ~19 x 48 products reordered (im2col vs direct conv): agreement to ~1e-6 relative
# measured here; 1e-5 leaves room across CPUs.
RTOL = 1e-5


@pytest.mark.parametrize("kernel,groups", [(19, 4), (8, 2)])
def test_matmul_conv_equals_xla_conv(monkeypatch, kernel, groups):
    config = tiny_config().replace(conv_pos_kernel_size=kernel, num_conv_pos_embedding_groups=groups)
    layer = modeling.PositionalConvLayer(config)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 37, config.hidden_size))
    params = layer.init(jax.random.PRNGKey(1), x)

    def run(backends):
        monkeypatch.setattr(modeling, "POS_CONV_MATMUL_BACKENDS", backends)
        f = lambda p, x: (layer.apply(p, x) ** 2).sum()  # noqa: E731
        out = layer.apply(params, x)
        grads = jax.grad(f, argnums=(0, 1))(params, x)
        return out, grads

    out_conv, grads_conv = run(())
    out_mm, grads_mm = run((jax.default_backend(),))
    assert out_mm.shape == out_conv.shape == x.shape
    np.testing.assert_allclose(out_mm, out_conv, rtol=RTOL, atol=RTOL)
    for a, b in zip(jax.tree.leaves(grads_mm), jax.tree.leaves(grads_conv), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * float(jnp.abs(b).max()))


def test_matmul_conv_is_in_the_gpu_lowering(monkeypatch):
    """The module picks the matmul form by backend: forced here, no convolution is left in the HLO."""
    config = tiny_config()
    layer = modeling.PositionalConvLayer(config)
    x = jnp.zeros((1, 16, config.hidden_size))
    params = layer.init(jax.random.PRNGKey(0), x)
    monkeypatch.setattr(modeling, "POS_CONV_MATMUL_BACKENDS", (jax.default_backend(),))
    text = jax.jit(layer.apply).lower(params, x).as_text()
    assert "convolution" not in text and "dot_general" in text
    monkeypatch.setattr(modeling, "POS_CONV_MATMUL_BACKENDS", ())
    assert "convolution" in jax.jit(layer.apply).lower(params, x).as_text()
