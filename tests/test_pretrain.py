"""data2vec pretraining objective (train/data2vec_objective.py) against fairseq's formulas.

The loss reference below is written from fairseq's `examples/data2vec/models/data2vec_audio.py`
(forward, `compute_var`) and `fairseq/modules/ema_module.py`, in PyTorch on transformers' model,
independently of the JAX code: the student is transformers' `Data2VecAudioModel` called with
`mask_time_indices`; the teacher's layer results are caught with forward hooks on each layer's
`feed_forward` (in eval mode its output is fairseq's `layer_result`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_d2v.config import tiny_config
from flax_d2v.errors import D2VError
from flax_d2v.modeling import Data2VecAudioModel, feat_extract_output_lengths, init_params
from flax_d2v.train.data2vec_objective import (
    Data2VecObjective,
    Data2VecPretrainConfig,
    data2vec_mask_indices,
    ema_decay_at,
)

# fp32 forward passes through two frameworks (different conv/matmul kernels, instance norm with
# eps 1e-5 amplifying small differences): agreement to a few ulps of the accumulated sums.
LOSS_RTOL = 2e-5
VAR_RTOL = 2e-5
# The EMA update is elementwise fp32 arithmetic: only rounding of d*t + (1-d)*s, compounded over steps.
EMA_RTOL = 1e-6

NUM_SAMPLES = 12000  # 37 frames: short, but long enough for several 10-frame spans


def _perturbed(tree, seed: int, scale: float = 0.1):
    """All params moved off their init (LayerNorms off identity, biases non-zero)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    return treedef.unflatten(noisy)


@pytest.fixture(scope="module")
def setup():
    config = tiny_config(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    module = Data2VecAudioModel(config)
    model_params = _perturbed(init_params(module, 0), 1)
    objective = Data2VecObjective(module, Data2VecPretrainConfig(average_top_k_layers=2))
    params = objective.init_params(model_params, jax.random.PRNGKey(2))
    teacher = objective.init_extra(params)
    teacher = {
        "encoder": {k: (v if k == "pos_conv_embed" else _perturbed(v, 3, 0.05)) for k, v in teacher["encoder"].items()}
    }
    rs = np.random.RandomState(0)
    wav = rs.randn(3, NUM_SAMPLES).astype(np.float32)
    am = np.ones((3, NUM_SAMPLES), np.int32)
    am[1, 9000:] = 0
    am[2, 6000:] = 0
    return config, module, params, teacher, wav, am


def _batch(wav, am, index=(3, 17, 42)):
    return {
        "input_values": wav,
        "attention_mask": am,
        "index": np.asarray(index, np.int32),
        "seconds": am.sum(-1) / 16000.0,
    }


# ------------------------------------------------------------------------------------------------
# The independent PyTorch rendering of fairseq's objective


def _hf_model(config, model_params):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flax_d2v.convert.hf import flax_to_state_dict, hf_config_dict

    model = transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig(**hf_config_dict(config, False)))
    state = {k: torch.from_numpy(np.array(v)) for k, v in flax_to_state_dict(model_params).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def fairseq_preds_targets(student, teacher, final_proj, wav, attention_mask, mask, top_k, real_frames=None):
    """fairseq's x[mask_indices] -> final_proj and y[mask_indices] (targets), as torch tensors.

    `real_frames` (frames per row): instance-normalise each row over its real frames only (our
    default); None: `F.instance_norm` over all frames, padding included (fairseq verbatim).
    """
    import torch
    import torch.nn.functional as F

    wav = torch.from_numpy(wav)
    am = None if attention_mask is None else torch.from_numpy(attention_mask).long()
    mask = torch.from_numpy(np.array(mask))
    results = []
    hooks = [
        layer.feed_forward.register_forward_hook(lambda mod, inp, out: results.append(out))
        for layer in teacher.encoder.layers
    ]
    with torch.no_grad():
        x = student(wav, attention_mask=am, mask_time_indices=mask).last_hidden_state
        teacher(wav, attention_mask=am)  # shared extractor/projection, unmasked, eval: no dropout
        for h in hooks:
            h.remove()
        target_layer_results = [tl.transpose(1, 2) for tl in results[-top_k:]]  # BTC -> BCT
        if real_frames is None:
            target_layer_results = [F.instance_norm(tl.float()) for tl in target_layer_results]
        else:
            target_layer_results = [
                torch.cat(
                    [
                        F.pad(F.instance_norm(tl[i : i + 1, :, :t].float()), (0, tl.shape[-1] - t))
                        for i, t in enumerate(real_frames)
                    ]
                )
                for tl in target_layer_results
            ]
        target_layer_results = [tl.transpose(1, 2) for tl in target_layer_results]  # BCT -> BTC
        y = sum(target_layer_results) / len(target_layer_results)
        y = y[mask]
        x = x[mask]
        weight = torch.from_numpy(np.array(final_proj["kernel"]).T)
        x = F.linear(x, weight, torch.from_numpy(np.array(final_proj["bias"])))
    return x, y


def fairseq_loss(x, y, loss_beta, loss_scale):
    """(loss.sum() * scale, sample_size, target_var, pred_var) as fairseq's forward returns them."""
    import torch
    import torch.nn.functional as F

    sz = x.size(-1)
    if loss_beta == 0:
        loss = F.mse_loss(x.float(), y.float(), reduction="none").sum(dim=-1)
    else:
        loss = F.smooth_l1_loss(x.float(), y.float(), reduction="none", beta=loss_beta).sum(dim=-1)
    scale = loss_scale if loss_scale is not None else 1 / math.sqrt(sz)

    def compute_var(t):
        t = t.view(-1, t.size(-1))
        return torch.sqrt(t.var(dim=0) + 1e-6).mean()

    return float(loss.sum() * scale), loss.numel(), float(compute_var(y)), float(compute_var(x.float()))


def _project_loss(module, cfg, params, teacher, batch, mask):
    objective = Data2VecObjective(module, cfg)
    fn = jax.jit(lambda p, e, b, m: objective.loss(p, e, b, jax.random.PRNGKey(0), jnp.int32(0), m, True))
    loss_sum, weight, metrics = fn(params, teacher, batch, mask)
    return float(loss_sum), float(weight), {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("padded,loss_beta,loss_scale", [(False, 0.0, None), (True, 0.25, 0.5)])
def test_loss_matches_fairseq_formula(setup, padded, loss_beta, loss_scale):
    """Default mode: target statistics over real frames only (== fairseq when nothing is padded,
    as in fairseq's own pretraining batches, which are cropped to the shortest clip)."""
    config, module, params, teacher, wav, am = setup
    cfg = Data2VecPretrainConfig(average_top_k_layers=2, loss_beta=loss_beta, loss_scale=loss_scale)
    objective = Data2VecObjective(module, cfg)
    if not padded:
        am = np.ones_like(am)
    batch = _batch(wav, am)
    mask = np.asarray(objective.masks(batch, jax.random.PRNGKey(7)))
    frames = [int(feat_extract_output_lengths(config, int(n))) for n in am.sum(-1)]
    for i, t in enumerate(frames):
        assert mask[i, :t].any() and not mask[i, t:].any(), "a mask fell into padding"
    loss_sum, weight, metrics = _project_loss(module, cfg, params, teacher, batch, mask)

    student = _hf_model(config, params["model"])
    teacher_hf = _hf_model(config, {**params["model"], "encoder": teacher["encoder"]})
    x, y = fairseq_preds_targets(
        student,
        teacher_hf,
        params["final_proj"],
        wav,
        am if padded else None,
        mask,
        2,
        real_frames=frames if padded else None,
    )
    ref_loss, ref_size, ref_tvar, ref_pvar = fairseq_loss(x, y, loss_beta, loss_scale)
    assert weight == ref_size
    np.testing.assert_allclose(loss_sum, ref_loss, rtol=LOSS_RTOL)
    np.testing.assert_allclose(metrics["target_var"], ref_tvar, rtol=VAR_RTOL)
    np.testing.assert_allclose(metrics["pred_var"], ref_pvar, rtol=VAR_RTOL)


def test_loss_matches_fairseq_verbatim_over_padding(setup):
    """`instance_norm_over_padding=True` is fairseq's formula on a padded batch (enable_padding)."""
    config, module, params, teacher, wav, am = setup
    cfg = Data2VecPretrainConfig(average_top_k_layers=2, instance_norm_over_padding=True)
    batch = _batch(wav, am)
    mask = np.asarray(Data2VecObjective(module, cfg).masks(batch, jax.random.PRNGKey(8)))
    loss_sum, weight, metrics = _project_loss(module, cfg, params, teacher, batch, mask)
    student = _hf_model(config, params["model"])
    teacher_hf = _hf_model(config, {**params["model"], "encoder": teacher["encoder"]})
    x, y = fairseq_preds_targets(student, teacher_hf, params["final_proj"], wav, am, mask, 2)
    ref_loss, ref_size, ref_tvar, ref_pvar = fairseq_loss(x, y, 0.0, None)
    assert weight == ref_size
    np.testing.assert_allclose(loss_sum, ref_loss, rtol=LOSS_RTOL)
    np.testing.assert_allclose(metrics["target_var"], ref_tvar, rtol=VAR_RTOL)
    np.testing.assert_allclose(metrics["pred_var"], ref_pvar, rtol=VAR_RTOL)


def test_student_path_is_the_models_forward(setup):
    """The objective's student pass (one feature-extractor run shared with the teacher) is
    `Data2VecAudioModel.__call__` with the same masks, and no gradient reaches the teacher."""
    from flax_d2v.train.data2vec_objective import _student_forward

    config, module, params, teacher, wav, am = setup
    objective = Data2VecObjective(module, Data2VecPretrainConfig(average_top_k_layers=2))
    batch = _batch(wav, am)
    mask = objective.masks(batch, jax.random.PRNGKey(3))
    x, _, frame_mask = module.apply({"params": params["model"]}, wav, am, mask, True, method=_student_forward)
    ref = module.apply({"params": params["model"]}, wav, am, mask_time_indices=mask)
    np.testing.assert_array_equal(np.asarray(frame_mask), np.asarray(ref.frame_mask))
    np.testing.assert_allclose(np.asarray(x), np.asarray(ref.last_hidden_state), atol=1e-6)

    loss = lambda p, e: objective.loss(p, e, batch, jax.random.PRNGKey(0), jnp.int32(0), mask)[0]
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, teacher)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[1]))
    assert float(jnp.abs(grads[0]["final_proj"]["kernel"]).max()) > 0.0
    assert float(jnp.abs(grads[0]["model"]["masked_spec_embed"]).max()) > 0.0


@pytest.mark.parametrize("remat_policy, scan_layers", [("none", False), ("nothing_saveable", True)])
def test_student_forward_with_dropout_is_the_models_call(setup, remat_policy, scan_layers):
    """Guard against drift between pretraining's student pass (the model's public steps, composed in
    `_student_forward`) and `Data2VecAudioModel.__call__`: in training mode, with every dropout and
    LayerDrop on, the same rng and the same time mask, both give the same output bit for bit, on the
    plain, remat and scanned layer paths; the teacher's input is the projection before dropout."""
    from flax_d2v.train.data2vec_objective import _student_forward

    *_, wav, am = setup
    dropouts = dict(feat_proj_dropout=0.1, hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    config = tiny_config(layerdrop=0.3, **dropouts)
    module = Data2VecAudioModel(config, remat_policy=remat_policy, scan_layers=scan_layers)
    model_params = init_params(module, 4)
    objective = Data2VecObjective(module, Data2VecPretrainConfig(average_top_k_layers=2))
    mask = objective.masks(_batch(wav, am), jax.random.PRNGKey(3))
    rngs = {"dropout": jax.random.PRNGKey(11)}
    v = {"params": model_params}
    x, clean, frame_mask = module.apply(v, wav, am, mask, False, method=_student_forward, rngs=rngs)
    ref = module.apply(v, wav, am, deterministic=False, mask_time_indices=mask, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(frame_mask), np.asarray(ref.frame_mask))
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref.last_hidden_state))
    # not vacuous: dropout changed the output
    eval_out = module.apply(v, wav, am, mask_time_indices=mask)
    assert not np.allclose(np.asarray(x), np.asarray(eval_out.last_hidden_state), atol=1e-3)
    # the teacher's input: the unmasked projection without feat_proj_dropout (fairseq's pre_encoder_features)
    projected = module.apply(v, wav, am, method="encode_features").hidden_states
    np.testing.assert_array_equal(np.asarray(clean), np.asarray(projected))


# ------------------------------------------------------------------------------------------------
# EMA teacher


def test_ema_decay_schedule_and_update_step_by_step(setup):
    """fairseq's `set_num_updates(n)` after update n: decay = get_annealed_rate(start, end, n, T)
    until T, then end; teacher = d * teacher + (1 - d) * student, positional conv copied."""
    _, module, params, teacher, _, _ = setup
    cfg = Data2VecPretrainConfig(average_top_k_layers=2, ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=4)
    objective = Data2VecObjective(module, cfg)

    def get_annealed_rate(start, end, curr_step, total_steps):  # fairseq, verbatim
        r = end - start
        pct_remaining = 1 - curr_step / total_steps
        return end - r * pct_remaining

    update = jax.jit(objective.update_extra)
    ref = jax.tree.map(np.asarray, teacher["encoder"])
    extra = teacher
    student = params
    for step in range(7):  # TrainState.step before the update: update number step + 1
        n = step + 1
        decay = cfg.ema_end_decay if n >= cfg.ema_anneal_end_step else get_annealed_rate(0.9, 0.99, n, 4)
        np.testing.assert_allclose(float(objective.ema_decay(n)), decay, rtol=1e-6)
        student = _perturbed(student, 100 + step, 0.01)  # "the optimizer step"
        extra = update(extra, student, jnp.int32(step))
        s = jax.tree.map(np.asarray, student["model"]["encoder"])
        ema = lambda t, x, d=decay: d * t + (1 - d) * x
        ref = {k: (s[k] if k == "pos_conv_embed" else jax.tree.map(ema, ref[k], s[k])) for k in ref}
        for a, b in zip(jax.tree.leaves(extra["encoder"]), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(np.asarray(a), b, rtol=EMA_RTOL, atol=EMA_RTOL)
    # copied, not averaged: equal to the student's bit for bit
    for a, b in zip(
        jax.tree.leaves(extra["encoder"]["pos_conv_embed"]),
        jax.tree.leaves(student["model"]["encoder"]["pos_conv_embed"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the layers are not the student's
    assert not np.allclose(
        np.asarray(extra["encoder"]["layers_0"]["attention"]["q_proj"]["kernel"]),
        np.asarray(student["model"]["encoder"]["layers_0"]["attention"]["q_proj"]["kernel"]),
    )

    # decay 1: fairseq skips the EMA step entirely (pos conv included)
    frozen = Data2VecObjective(module, Data2VecPretrainConfig(average_top_k_layers=2, ema_decay=1.0, ema_end_decay=1.0))
    same = frozen.update_extra(teacher, _perturbed(params, 5), jnp.int32(0))
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(teacher), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # schedule: constant after the anneal end, and a plain function of the update count
    base = Data2VecPretrainConfig()
    assert float(ema_decay_at(base, 0)) == pytest.approx(0.999)
    assert float(ema_decay_at(base, 15000)) == pytest.approx(0.99945, rel=1e-6)
    assert float(ema_decay_at(base, 30000)) == pytest.approx(0.9999) == float(ema_decay_at(base, 10**6))


# ------------------------------------------------------------------------------------------------
# Masks


def fairseq_mask_counts(rng, sz, mask_prob, mask_length, min_masks=1):
    """Masked frames of one row by fairseq's compute_mask_indices (static, no_overlap False,
    idc_select_ver 1, num_mask_ver 2), before require_same_masks, in NumPy."""
    num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + rng.random()))
    lengths = np.full(num_mask, mask_length)
    min_len = min(lengths)
    if sz - min_len <= num_mask:
        min_len = sz - num_mask - 1
    mask_idc = rng.choice(sz - min_len, num_mask, replace=False)
    mask_idc = np.asarray([mask_idc[j] + offset for j in range(len(mask_idc)) for offset in range(lengths[j])])
    return len(np.unique(mask_idc[mask_idc < sz]))


def test_masks_follow_fairseq_and_depend_only_on_key_and_index():
    rows, frames, trials = 16, 200, 40
    lengths = np.array([200, 150, 120, 90] * 4)
    fn = jax.jit(
        lambda k, n, same: jax.vmap(
            lambda kk: data2vec_mask_indices(
                jax.vmap(lambda i: jax.random.fold_in(kk, i))(jnp.arange(rows)), n, frames, 0.65, 10, 1, same
            )
        )(k),
        static_argnums=2,
    )
    keys = jax.random.split(jax.random.PRNGKey(0), trials)
    free = np.asarray(fn(keys, jnp.asarray(lengths), False))  # (trials, rows, frames)
    same = np.asarray(fn(keys, jnp.asarray(lengths), True))

    # padding respected, and as in fairseq the last real frame is never a span start's cover
    for r, n in enumerate(lengths):
        assert not free[:, r, n - 1 :].any() and not same[:, r, n - 1 :].any()
    # require_same_masks: every row of a batch has the same count, the smallest, a subset of the spans
    counts = same.sum(-1)
    assert (counts == counts[:, :1]).all()
    np.testing.assert_array_equal(counts[:, 0], free.sum(-1).min(-1))
    assert not (same & ~free).any()
    # coverage: the distribution of fairseq's count per row length (overlapping spans cover ~49%,
    # not mask_prob), compared by means with a 5-sigma tolerance
    rng = np.random.default_rng(0)
    for n in (200, 120, 90):
        ref = np.array([fairseq_mask_counts(rng, n, 0.65, 10) for _ in range(4000)])
        ours = free[:, lengths == n].sum(-1).ravel()
        tol = 5 * np.sqrt(ref.var() / len(ref) + ours.var() / len(ours))
        assert abs(ours.mean() - ref.mean()) < tol, (n, ours.mean(), ref.mean())
    assert 0.4 < free[:, 0].mean() < 0.6

    # device independence: a row is a function of its key (seed, step, index) and length only,
    # so splitting or permuting the batch does not change it
    k = jax.random.PRNGKey(5)
    index = jnp.arange(8) * 7 + 3
    example = jax.vmap(lambda i: jax.random.fold_in(k, i))(index)
    n = jnp.asarray([200, 180, 160, 140, 200, 180, 160, 140])
    whole = np.asarray(data2vec_mask_indices(example, n, frames, 0.65, 10, 1, False))
    halves = [
        np.asarray(data2vec_mask_indices(example[s], n[s], frames, 0.65, 10, 1, False))
        for s in (slice(0, 4), slice(4, 8))
    ]
    np.testing.assert_array_equal(whole, np.concatenate(halves))
    perm = np.array([3, 1, 7, 0, 5, 2, 6, 4])
    permuted = np.asarray(data2vec_mask_indices(example[perm], n[perm], frames, 0.65, 10, 1, True))
    np.testing.assert_array_equal(
        permuted, np.asarray(data2vec_mask_indices(example, n, frames, 0.65, 10, 1, True))[perm]
    )
    # an all-padding row gets no mask and does not zero everyone else's
    with_empty = np.asarray(data2vec_mask_indices(example, n.at[2].set(0), frames, 0.65, 10, 1, True))
    assert not with_empty[2].any() and with_empty[0].sum() > 0


# ------------------------------------------------------------------------------------------------
# Collapse guard


def test_guard_fires_on_collapsed_teacher(setup):
    """A teacher whose top layers emit the same vector at every frame gives instance-normalised
    targets of 0 (target_var = sqrt(1e-6)); past --guard-after the check stops with a clear message."""
    config, module, params, teacher, wav, am = setup
    objective = Data2VecObjective(module, Data2VecPretrainConfig(average_top_k_layers=2, guard_after=100))
    collapsed = jax.tree.map(lambda x: x, teacher)
    for i in range(config.num_hidden_layers):
        ffn = collapsed["encoder"][f"layers_{i}"]["feed_forward"]["output_dense"]
        ffn["kernel"] = jnp.zeros_like(ffn["kernel"])
        ffn["bias"] = jnp.full_like(ffn["bias"], 0.3)
    batch = _batch(wav, am)
    _, _, metrics = objective.loss(params, collapsed, batch, jax.random.PRNGKey(0), jnp.int32(0))
    metrics = {k: float(v) for k, v in metrics.items()}
    assert metrics["target_var"] == pytest.approx(1e-3, rel=1e-3)
    objective.check(metrics, 100)  # not past guard_after yet: fairseq checks num_updates > 5000
    message = r"target_var: 0\.001 < 0\.1 at update 101: the teacher targets have collapsed"
    with pytest.raises(D2VError, match=message):
        objective.check(metrics, 101)

    # a collapsed student head: constant predictions
    dead = {
        **params,
        "final_proj": {"kernel": jnp.zeros_like(params["final_proj"]["kernel"]), "bias": params["final_proj"]["bias"]},
    }
    _, _, metrics = objective.loss(dead, teacher, batch, jax.random.PRNGKey(0), jnp.int32(0))
    metrics = {k: float(v) for k, v in metrics.items()}
    assert metrics["target_var"] > 0.1
    with pytest.raises(D2VError, match=r"pred_var: .* < 0\.01 at update 101: the student predictions have collapsed"):
        objective.check(metrics, 101)
    # healthy metrics pass
    objective.check({"target_var": 0.5, "pred_var": 0.5}, 10**6)


# ------------------------------------------------------------------------------------------------
# d2v pretrain, end to end on real speech


E2E_CLIPS = ("16k/slt_arctic_a0009.wav", "16k/librivox_0880.wav", "16k/librivox_0930.wav", "16k/forever.wav")
# transformers' PyTorch model against ours on the exported student (fp32, different kernels).
EXPORT_ATOL = 1e-4


def _run_pretrain(manifest, out, *extra):
    from flax_d2v.cli import main

    # batch 4 of 4 clips: every batch crops to the same width, so the step compiles once
    return main(
        [
            "pretrain",
            "--train",
            str(manifest),
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--config",
            "tiny",
            "--average-top-k-layers",
            "2",
            "--log-every",
            "2",
            "--no-progress",
            "--no-async-checkpoint",
            "--num-workers",
            "0",  # in this process (worker processes: test_loader_workers, test_resume)
            *extra,
        ]
    )


def test_d2v_pretrain_end_to_end(speech_dir, tmp_path):
    manifest = _manifest(speech_dir, tmp_path)
    run = tmp_path / "run"
    assert _run_pretrain(manifest, run, "--steps", "4", "--save-every", "2") == 0

    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert {"step", "loss", "lr", "ema_decay", "target_var", "pred_var"} <= set(r)
        assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["target_var"] > 0 and r["pred_var"] > 0
        assert 0.999 <= r["ema_decay"] < 0.9991
    assert (run / "training_curves.png").is_file()

    # RUN/hf: transformers loads the student with nothing missing, and computes what we compute
    from flax_d2v.checkpoint import load_flax, load_flax_aux

    config, student = load_flax(run / "flax")
    aux = load_flax_aux(run / "flax")
    assert set(aux) == {"final_proj", "ema"}
    assert set(aux["ema"]) == set(student["encoder"])
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf, info = transformers.Data2VecAudioModel.from_pretrained(run / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    import soundfile as sf

    wav, _ = sf.read(speech_dir / E2E_CLIPS[0], dtype="float32")
    wav = ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-7))[None, :16000].astype(np.float32)
    with torch.no_grad():
        ref = hf.eval()(torch.from_numpy(wav)).last_hidden_state.numpy()
    ours = Data2VecAudioModel(config).apply({"params": student}, jnp.asarray(wav)).last_hidden_state
    np.testing.assert_allclose(np.asarray(ours), ref, atol=EXPORT_ATOL)


def _manifest(speech_dir, tmp_path):
    manifest = tmp_path / "clips.tsv"
    manifest.write_text("path\n" + "".join(f"{speech_dir / c}\n" for c in E2E_CLIPS), encoding="utf-8")
    return manifest


@pytest.mark.slow
def test_d2v_pretrain_guard_stops_the_run(speech_dir, tmp_path, capsys):
    """The loop calls `objective.check` on each logged row: an impossible floor stops the run with one line."""
    code = _run_pretrain(
        _manifest(speech_dir, tmp_path),
        tmp_path / "guarded",
        "--steps",
        "2",
        "--guard-after",
        "0",
        "--min-target-var",
        "10",
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "d2v pretrain: error: target_var:" in err and "< 10.0 at update 2" in err and "Traceback" not in err


@pytest.mark.slow
def test_d2v_pretrain_resumes_with_its_teacher(speech_dir, tmp_path):
    """Stopped after 2 updates and started again, the run goes on from the checkpoint (teacher included)
    and ends where an uninterrupted run ends."""
    from flax_d2v.checkpoint import load_flax, load_flax_aux

    manifest = _manifest(speech_dir, tmp_path)
    flat = ("--lr-schedule", "constant", "--save-every", "2")  # tri_stage's phases would depend on --steps
    assert _run_pretrain(manifest, tmp_path / "once", "--steps", "4", *flat) == 0
    assert _run_pretrain(manifest, tmp_path / "twice", "--steps", "2", *flat) == 0
    assert _run_pretrain(manifest, tmp_path / "twice", "--steps", "4", *flat) == 0
    for name in ("once", "twice"):
        assert (tmp_path / name / "metrics.jsonl").read_text().count("\n") == 2
    a, b = load_flax(tmp_path / "once" / "flax")[1], load_flax(tmp_path / "twice" / "flax")[1]
    ta, tb = load_flax_aux(tmp_path / "once" / "flax"), load_flax_aux(tmp_path / "twice" / "flax")
    for x, y in zip(jax.tree.leaves((a, ta)), jax.tree.leaves((b, tb)), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_ema_schedule_continues_from_a_fairseq_checkpoints_update_count(setup, tmp_path):
    """Starting from a fairseq .pt with its teacher, the decay goes on from the checkpoint's
    `num_updates` (1234 in the fixture) instead of restarting at `ema_decay`."""
    pytest.importorskip("torch")
    import fairseq_fixtures as F

    from flax_d2v.train.pretrain_run import load_init

    _, module, _, _, _, _ = setup
    cfg = Data2VecPretrainConfig(
        average_top_k_layers=2, ema_decay=0.9, ema_end_decay=0.99, ema_anneal_end_step=2000, ema_start_update=1234
    )
    objective = Data2VecObjective(module, cfg)
    fresh = Data2VecObjective(module, dataclasses.replace(cfg, ema_start_update=0))
    np.testing.assert_allclose(float(objective.ema_decay(1)), float(fresh.ema_decay(1235)), rtol=1e-7)
    np.testing.assert_allclose(float(objective.ema_decay(766)), 0.99, rtol=1e-7)

    pt = F.save_checkpoint(F.checkpoint(F.hf_model(ctc=False), ctc=False), tmp_path / "ckpt.pt")
    *_, seen = load_init({"model": str(pt), "config": None})
    assert seen == 1234
    no_teacher = F.save_checkpoint(F.checkpoint(F.hf_model(ctc=False), ctc=False, ema=False), tmp_path / "noema.pt")
    *_, seen = load_init({"model": str(no_teacher), "config": None})
    assert seen == 0
