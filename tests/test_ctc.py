"""CTC loss and greedy decoding against torch.nn.functional.ctc_loss and by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_d2v.train.ctc import ctc_loss_per_example, ctc_needed_frames, greedy_decode, reduce_ctc

# float32 forward-backward over ~40 frames: both libraries sum in log space in a different order.
LOSS_RTOL = 1e-4
GRAD_ATOL = 1e-5


def _random_case(seed: int = 0, b: int = 4, t: int = 40, v: int = 12, max_label: int = 15):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 2
    frame_lengths = np.array([t, t - 7, t - 13, 6])[:b]
    label_lengths = np.array([max_label, 9, 3, 12])[:b]  # the last one cannot fit in 6 frames
    labels = np.full((b, max_label), -100, np.int64)
    for i, n in enumerate(label_lengths):
        labels[i, :n] = rng.integers(1, v, size=n)
    labels[0, 3] = labels[0, 2]  # a repeated pair needs a blank between
    return logits, frame_lengths, labels, label_lengths


def _torch_losses(logits, frame_lengths, labels, label_lengths, zero_infinity, reduction="none"):
    torch = pytest.importorskip("torch")
    lp = torch.log_softmax(torch.tensor(logits), -1).transpose(0, 1)
    targets = torch.tensor(np.where(labels < 0, 0, labels))
    return torch.nn.functional.ctc_loss(
        lp,
        targets,
        torch.tensor(frame_lengths),
        torch.tensor(label_lengths),
        blank=0,
        reduction=reduction,
        zero_infinity=zero_infinity,
    )


def test_per_example_loss_matches_torch():
    logits, frame_lengths, labels, label_lengths = _random_case()
    ours, lengths, impossible = ctc_loss_per_example(
        jnp.asarray(logits), jnp.asarray(frame_lengths), jnp.asarray(labels), zero_infinity=True
    )
    ref = _torch_losses(logits, frame_lengths, labels, label_lengths, zero_infinity=True).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=LOSS_RTOL)
    assert np.asarray(lengths).tolist() == label_lengths.tolist()
    assert np.asarray(impossible).tolist() == [False, False, False, True]
    # torch says inf where we say impossible
    ref_inf = _torch_losses(logits, frame_lengths, labels, label_lengths, zero_infinity=False).numpy()
    assert np.isinf(ref_inf[3]) and np.isfinite(ref_inf[:3]).all()
    ours_no_zero, _, _ = ctc_loss_per_example(
        jnp.asarray(logits), jnp.asarray(frame_lengths), jnp.asarray(labels), zero_infinity=False
    )
    assert float(ours_no_zero[3]) > 1e4  # optax's finite floor instead of inf (documented)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_hf_reductions_match_torch(reduction):
    logits, frame_lengths, labels, label_lengths = _random_case(seed=1)
    per, lengths, _ = ctc_loss_per_example(jnp.asarray(logits), jnp.asarray(frame_lengths), jnp.asarray(labels))
    total, weight = reduce_ctc(per, lengths, jnp.ones(4, bool), reduction)
    ref = float(_torch_losses(logits, frame_lengths, labels, label_lengths, True, reduction))
    np.testing.assert_allclose(float(total / weight), ref, rtol=LOSS_RTOL)


def test_gradients_match_torch():
    torch = pytest.importorskip("torch")
    logits, frame_lengths, labels, label_lengths = _random_case(seed=2)

    def ours(x):
        per, lengths, _ = ctc_loss_per_example(x, jnp.asarray(frame_lengths), jnp.asarray(labels))
        total, weight = reduce_ctc(per, lengths, jnp.ones(4, bool), "token")
        return total / weight

    g = np.asarray(jax.grad(ours)(jnp.asarray(logits)))
    x = torch.tensor(logits, requires_grad=True)
    lp = torch.log_softmax(x, -1).transpose(0, 1)
    per = torch.nn.functional.ctc_loss(
        lp,
        torch.tensor(np.where(labels < 0, 0, labels)),
        torch.tensor(frame_lengths),
        torch.tensor(label_lengths),
        blank=0,
        reduction="none",
        zero_infinity=True,
    )
    (per.sum() / label_lengths.sum()).backward()
    np.testing.assert_allclose(g, x.grad.numpy(), atol=GRAD_ATOL)
    assert np.all(g[3] == 0)  # the impossible example has no gradient


def test_token_reduction_is_fairseq_sum_over_tokens():
    per = jnp.array([2.0, 4.0, 6.0])
    lengths = jnp.array([1, 2, 3])
    total, weight = reduce_ctc(per, lengths, jnp.array([True, True, False]), "token")
    assert float(total) == 6.0 and float(weight) == 3.0


def test_needed_frames_counts_repeats():
    labels = jnp.array([[1, 1, 2, 2, 0]])
    pad = jnp.array([[0, 0, 0, 0, 1.0]])
    assert int(ctc_needed_frames(labels, pad)[0]) == 6


def test_greedy_decode():
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, "A": 5, "B": 6}
    ids = np.array([[5, 5, 0, 5, 4, 4, 6, 0, 6, 4, 1, 9], [0, 0, 6, 6, 6, 0, 0, 0, 0, 0, 0, 0]])
    assert greedy_decode(ids, np.array([10, 6]), vocab) == ["AA BB", "B"]


@pytest.mark.slow  # ~43 s on 2 cores, over the suite budget; the tests above check the loss against torch
def test_unrolled_ctc_equals_optax_values_and_gradients():
    """`ctc_loss` (the one fine-tuning runs, unrolled for accelerators) is optax's recursion:
    same per-example values and gradients, for every unroll factor, with padded frames/labels."""
    import jax
    import jax.numpy as jnp
    import optax

    from flax_d2v.train.ctc import ctc_loss

    rng = np.random.default_rng(0)
    b, t, k, n = 4, 23, 12, 9
    logits = jnp.asarray(rng.standard_normal((b, t, k)), jnp.float32)
    logit_pad = (jnp.arange(t)[None] >= jnp.array([23, 20, 15, 10])[:, None]).astype(jnp.float32)
    labels = jnp.asarray(rng.integers(1, k, (b, n)))
    labels = labels.at[0, 3].set(labels[0, 2])  # a repeat, which needs a blank between
    label_pad = (jnp.arange(n)[None] >= jnp.array([9, 6, 3, 1])[:, None]).astype(jnp.float32)
    want = optax.ctc_loss(logits, logit_pad, labels, label_pad)
    want_grad = jax.grad(lambda x: optax.ctc_loss(x, logit_pad, labels, label_pad).sum())(logits)
    for unroll in (None, 1, 4, 16):  # the default, none, one that does not divide T, the accelerators' value
        got = ctc_loss(logits, logit_pad, labels, label_pad, unroll=unroll)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
        grad = jax.grad(lambda x, u=unroll: ctc_loss(x, logit_pad, labels, label_pad, unroll=u).sum())(logits)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-5, atol=1e-6)
