"""Model behaviour: deterministic by default, training randomness from the rng only, remat, bf16, masks."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_d2v
from flax_d2v.data2vec2 import Data2Vec2Model, ForwardOptionsV2
from flax_d2v.masking import compute_mask_indices, per_example_mask_indices
from flax_d2v.modeling import ForwardOptions

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 12000)), jnp.float32)
MASK = jnp.asarray(np.r_[np.ones(12000), np.r_[np.ones(9000), np.zeros(3000)]].reshape(2, 12000), jnp.int32)


@pytest.fixture(scope="module")
def ctc():
    config = flax_d2v.tiny_config(
        layerdrop=0.5, mask_time_prob=0.3, mask_time_length=4, mask_feature_prob=0.2, mask_feature_length=8
    )
    module = flax_d2v.Data2VecAudioForCTC(config)
    return module, flax_d2v.init_params(module, 0)


def test_deterministic_by_default(ctc):
    module, params = ctc
    a = module.apply({"params": params}, X, MASK)
    b = module.apply({"params": params}, X, MASK)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))


def test_training_randomness_is_a_function_of_the_rng(ctc):
    module, params = ctc

    def run(seed):
        return np.asarray(
            module.apply(
                {"params": params}, X, MASK, deterministic=False, rngs={"dropout": jax.random.PRNGKey(seed)}
            ).logits
        )

    ref = np.asarray(module.apply({"params": params}, X, MASK).logits)
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))
    assert not np.allclose(run(1), ref)


def test_spec_augment_replaces_masked_frames_with_masked_spec_embed(ctc):
    module, params = ctc
    t = flax_d2v.feat_extract_output_lengths(module.config, 12000)
    mask = np.zeros((2, t), bool)
    mask[:, 5:9] = True
    out = module.apply(
        {"params": params},
        X,
        MASK,
        mask_time_indices=jnp.asarray(mask),
        output_hidden_states=True,
        capture_intermediates=True,
        mutable=["intermediates"],
    )[0]
    ref = module.apply({"params": params}, X, MASK, output_hidden_states=True)
    h0, r0 = np.asarray(out.hidden_states[0]), np.asarray(ref.hidden_states[0])
    assert not np.allclose(h0[:, 5:9], r0[:, 5:9])
    # far from the masked span (beyond the positional conv's reach) nothing changes
    np.testing.assert_allclose(h0[:, 30:], r0[:, 30:], atol=1e-6)


def test_remat_same_values_and_gradients():
    config = flax_d2v.tiny_config(mask_time_prob=0.0)
    plain = flax_d2v.Data2VecAudioForCTC(config)
    params = flax_d2v.init_params(plain, 1)

    def grads(module):
        return jax.grad(lambda p: module.apply({"params": p}, X, MASK).logits.sum())(params)

    g1 = grads(plain)
    g2 = grads(flax_d2v.Data2VecAudioForCTC(config, remat_policy="nothing_saveable"))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        # 1e-4 relative: same math, recomputation may fuse differently in fp32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_bf16_compute_keeps_fp32_params_and_stays_close():
    config = flax_d2v.tiny_config(mask_time_prob=0.0)
    module32 = flax_d2v.Data2VecAudioModel(config)
    params = flax_d2v.init_params(module32, 2)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    a = np.asarray(module32.apply({"params": params}, X).last_hidden_state)
    b = module32.clone(dtype=jnp.bfloat16).apply({"params": params}, X).last_hidden_state
    assert b.dtype == jnp.bfloat16
    # bf16 has an 8-bit mantissa (~4e-3 relative per op): after a dozen ops 0.1 of the scale is a loose bound
    assert np.abs(np.asarray(b, np.float32) - a).max() < 0.1 * np.abs(a).max()


def test_mask_indices_semantics():
    key = jax.random.PRNGKey(0)
    lengths = jnp.asarray([200, 120, 60])
    m = np.asarray(compute_mask_indices(key, (3, 200), 0.5, 10, min_masks=2, lengths=lengths))
    assert m.shape == (3, 200) and m.dtype == bool
    assert not m[1, 120:].any() and not m[2, 60:].any()  # padding never masked
    assert 0.2 < m[0].mean() < 0.6  # overlapping spans cover a bit less than mask_prob
    np.testing.assert_array_equal(m, np.asarray(compute_mask_indices(key, (3, 200), 0.5, 10, 2, lengths)))
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(4))
    full = np.asarray(per_example_mask_indices(keys, 100, 0.3, 5))
    half = np.asarray(per_example_mask_indices(keys[2:], 100, 0.3, 5))
    np.testing.assert_array_equal(full[2:], half)  # a row depends on its own key only


def test_forward_options_are_the_models_keywords():
    """`ForwardOptions` (what CTC and the heads forward) lists exactly the models' keyword-only
    options: an option added to a model's `__call__` but not there fails here."""

    def keyword_only(cls):
        params = inspect.signature(cls.__call__).parameters.values()
        return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    assert ForwardOptions.__optional_keys__ == keyword_only(flax_d2v.Data2VecAudioModel)
    assert ForwardOptionsV2.__optional_keys__ == keyword_only(Data2Vec2Model)
