"""data2vec 2.0 pretraining: the loss against an independent PyTorch rendering of fairseq's forward and
`d2v_loss`, block-mask statistics against fairseq's `compute_block_mask_1d`, and a tiny `d2v pretrain
--arch data2vec2` run whose student fine-tunes with `d2v finetune`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fairseq2_fixtures as F2  # noqa: E402
from fairseq_fixtures import save_checkpoint  # noqa: E402

# The bar for the 2.0 loss against fairseq's formula on the same masks and weights.
LOSS_RTOL = 2e-5


def compute_block_mask_1d(shape, mask_prob, mask_length, mask_prob_adjust=0.0, inverse_mask=False, mask_dropout=0.0):
    """fairseq/data/data_utils.py `compute_block_mask_1d`, verbatim for non_overlapping=False,
    expand_adjcent=False, require_same_masks=True."""
    B, L = shape
    if inverse_mask:
        mask_prob = 1 - mask_prob
    mask = torch.zeros((B, L))
    mask_inds = torch.randint(
        0, L, size=(B, int(L * ((mask_prob + mask_prob_adjust) / mask_length) * (1 + mask_dropout)))
    )
    mask.view(B, -1).scatter_(1, mask_inds, 1)
    centers = mask.nonzero(as_tuple=True)
    inds = ([], [])
    offset = mask_length // 2
    for i in range(mask_length):
        k1 = i - offset
        inds[0].append(centers[0])
        inds[1].append(centers[1] + k1)
    i0 = torch.cat(inds[0])
    i1 = torch.cat(inds[1]).clamp_(min=0, max=L - 1)
    mask[(i0, i1)] = 1
    mask = mask.view(B, -1)
    n_masks = mask.sum(dim=-1)
    final_target_len = int(L * (mask_prob))
    for i in range(len(mask)):
        n = n_masks[i]
        m = mask[i]
        if n > final_target_len:
            to_unmask = torch.multinomial(m, int(n - final_target_len), replacement=False)
            m[to_unmask] = 0
        elif n < final_target_len:
            to_mask = torch.multinomial((1 - m), int(final_target_len - n), replacement=False)
            m[to_mask] = 1
    if inverse_mask:
        mask = 1 - mask
    return mask


def _runs(mask):
    """(number of masked runs per row, mean run length) of a (N, T) 0/1 array."""
    m = np.asarray(mask, np.int8)
    starts = np.diff(np.pad(m, ((0, 0), (1, 0))), axis=1) == 1
    n = starts.sum(1)
    return n.mean(), m.sum() / max(n.sum(), 1)


@pytest.mark.parametrize("inverse", [False, True])
def test_block_mask_statistics_match_fairseq(inverse):
    from flax_d2v.train.data2vec2_objective import Data2Vec2PretrainConfig, clone_masks

    T, rows = 249, 4000
    cfg = Data2Vec2PretrainConfig(clone_batch=8, inverse_mask=inverse, mask_prob=0.5 if not inverse else 0.65)
    ours = np.asarray(clone_masks(jax.random.split(jax.random.PRNGKey(0), rows // 8), T, cfg))
    torch.manual_seed(0)
    ref = compute_block_mask_1d((rows, T), cfg.mask_prob, cfg.mask_length, cfg.mask_prob_adjust, inverse).numpy()
    assert ours.shape == ref.shape
    # the same exact count per row (static shapes), and the same value fairseq ends with
    assert set(ours.sum(1)) == set(ref.sum(1).astype(int)) == {cfg.masked_count(T)}
    (n_ours, len_ours), (n_ref, len_ref) = _runs(ours), _runs(ref)
    assert abs(n_ours - n_ref) / n_ref < 0.02 and abs(len_ours - len_ref) / len_ref < 0.02, (
        n_ours,
        n_ref,
        len_ours,
        len_ref,
    )
    # where masks fall: edges (clamped spans) included, per position
    np.testing.assert_allclose(ours.mean(0), ref.mean(0), atol=0.05)
    np.testing.assert_allclose(ours[:, :3].mean(), ref[:, :3].mean(), atol=0.02)


def test_loss_matches_pytorch_d2v_loss(tmp_path, speech_dir):
    from flax_d2v.audio import load_audio
    from flax_d2v.convert import fairseq2_reference as R
    from flax_d2v.convert.fairseq import load_fairseq
    from flax_d2v.data2vec2 import Data2Vec2Model
    from flax_d2v.train.data2vec2_objective import Data2Vec2Objective, Data2Vec2PretrainConfig

    ckpt, student, teacher = F2.pretrained_checkpoint("large")
    ck = load_fairseq(save_checkpoint(ckpt, tmp_path / "m.pt"))
    clone, top_k = 3, 2
    obj = Data2Vec2Objective(
        Data2Vec2Model(ck.config), Data2Vec2PretrainConfig(clone_batch=clone, average_top_k_layers=top_k)
    )
    params = obj.init_params(ck.params, jax.random.PRNGKey(0), ck.aux["decoder"])
    extra = {"teacher": ck.aux["ema"]}
    w = load_audio(speech_dir / "16k/awb_arctic_a0007.wav")
    source = np.stack([w[:16000], w[16000:32000]]).astype(np.float32)
    batch = {"input_values": source, "index": np.array([0, 1])}
    mask = obj.masks(batch, jax.random.PRNGKey(3))
    t = mask.shape[1]
    k = t - obj.config.masked_count(t)
    noise = 0.01 * jax.random.normal(jax.random.PRNGKey(4), (2 * clone, t - k, ck.config.hidden_size))
    loss, weight, metrics = obj.loss(
        params, extra, batch, jax.random.PRNGKey(0), jnp.asarray(0), mask=mask, mask_noise=noise, deterministic=True
    )
    ref = R.pretrain_loss(
        student,
        teacher,
        torch.from_numpy(source),
        torch.from_numpy(np.array(mask)),
        torch.from_numpy(np.array(noise)),
        clone,
        top_k,
    )
    assert int(weight) == ref["sample_size"] == 2 * clone * (t - k)
    np.testing.assert_allclose(float(loss), float(ref["losses"].sum()), rtol=LOSS_RTOL)
    np.testing.assert_allclose(float(metrics["target_var"]), float(ref["target_var"]), rtol=LOSS_RTOL)
    np.testing.assert_allclose(float(metrics["pred_var"]), float(ref["pred_var"]), rtol=LOSS_RTOL)
    assert math.isclose(float(metrics["masked_pct"]), 1 - k / t, rel_tol=1e-6)


def test_ema_decay_and_teacher_update():
    from flax_d2v.data2vec2 import Data2Vec2Model, tiny_config_v2
    from flax_d2v.modeling import init_params
    from flax_d2v.train.data2vec2_objective import Data2Vec2Objective, Data2Vec2PretrainConfig

    m = Data2Vec2Model(tiny_config_v2())
    obj = Data2Vec2Objective(m, Data2Vec2PretrainConfig(average_top_k_layers=2))
    params = obj.init_params(init_params(m), jax.random.PRNGKey(1))
    extra = obj.init_extra(params)
    assert set(extra["teacher"]) == {
        "relative_positional_encoder",
        "alibi_scale",
        "context_encoder",
        "blocks_0",
        "blocks_1",
    }
    np.testing.assert_allclose(float(obj.ema_decay(0)), 0.999)
    np.testing.assert_allclose(float(obj.ema_decay(37500)), 0.999 + 0.5 * (0.99999 - 0.999), rtol=1e-7)
    np.testing.assert_allclose(float(obj.ema_decay(80000)), 0.99999)
    moved = jax.tree.map(lambda x: x + 1.0, params)
    new = obj.update_extra(extra, moved, jnp.asarray(0))
    d = float(obj.ema_decay(1))
    np.testing.assert_allclose(new["teacher"]["alibi_scale"], extra["teacher"]["alibi_scale"] + (1 - d), rtol=1e-6)


def test_d2v_pretrain_data2vec2_then_finetune(speech_dir, tmp_path):
    """A tiny `d2v pretrain --arch data2vec2` run on real speech logs loss, target_var, pred_var, ema_decay;
    its student fine-tunes with `d2v finetune`, and exports back to fairseq."""
    import json

    from test_finetune import OVERFIT_CLIPS, write_manifest
    from test_pretrain import _manifest

    from flax_d2v.cli import main

    manifest = _manifest(speech_dir, tmp_path)
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--arch",
                "data2vec2",
                "--train",
                str(manifest),
                "--out",
                str(run),
                "--batch-size",
                "4",
                "--config",
                "tiny",
                "--average-top-k-layers",
                "2",
                "--clone-batch",
                "2",
                "--steps",
                "6",
                "--log-every",
                "2",
                "--no-progress",
                "--no-async-checkpoint",
                "--num-workers",
                "0",  # in this process (worker processes: test_loader_workers, test_resume)
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        assert {"loss", "lr", "ema_decay", "target_var", "pred_var", "masked_pct"} <= set(r)
        assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["target_var"] > 0 and r["pred_var"] > 0
        assert 0.999 <= r["ema_decay"] < 0.99901
        assert 0.49 < r["masked_pct"] < 0.51
    settings = json.loads((run / "pretrain_config.json").read_text())
    assert (settings["lr_schedule"], settings["mask_length"], settings["ema_anneal_end_step"]) == ("cosine", 5, 75000)
    from flax_d2v.checkpoint import load_flax_aux

    aux = load_flax_aux(run / "flax")
    assert set(aux) == {"ema", "decoder"}
    assert main(["convert", str(run / "flax"), str(tmp_path / "v2.pt"), "--to", "fairseq"]) == 0

    from flax_d2v.commands.finetune import resolve
    from flax_d2v.train import finetune

    ft = write_manifest(speech_dir, OVERFIT_CLIPS, tmp_path / "four.tsv")
    result = finetune(
        resolve(
            dict(
                train=str(ft),
                model=str(run / "flax"),
                out=str(tmp_path / "ft"),
                steps=3,
                batch_size=4,
                learning_rate=1e-4,
                log_every=1,
                progress=False,
            )
        )
    )
    assert result.step == 3 and (tmp_path / "ft" / "flax" / "vocab.json").is_file()


def test_d2v_pretrain_data2vec2_resumes_a_fairseq_pt_with_its_teacher(speech_dir, tmp_path):
    import json

    from test_pretrain import _manifest

    from flax_d2v.checkpoint import load_flax, load_flax_aux
    from flax_d2v.cli import main
    from flax_d2v.convert.fairseq import load_fairseq
    from flax_d2v.params import flatten

    ckpt = F2.pretrained_checkpoint("base")[0]
    pt = save_checkpoint(ckpt, tmp_path / "base_libri.pt")
    run = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--arch",
                "data2vec2",
                "--train",
                str(_manifest(speech_dir, tmp_path)),
                "--out",
                str(run),
                "--batch-size",
                "4",
                "--model",
                str(pt),
                "--average-top-k-layers",
                "2",
                "--clone-batch",
                "2",
                "--steps",
                "1",
                "--log-every",
                "1",
                "--no-progress",
                "--no-async-checkpoint",
                "--num-workers",
                "0",  # in this process (worker processes: test_loader_workers, test_resume)
            ]
        )
        == 0
    )
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    # the decay continues from the checkpoint's 4321 updates
    np.testing.assert_allclose(row["ema_decay"], 0.999 + (0.99999 - 0.999) * 4322 / 75000, rtol=1e-7)
    before = load_fairseq(pt)
    _, student = load_flax(run / "flax")
    aux = load_flax_aux(run / "flax")
    t_after, t_before, s_after = flatten(aux["ema"]), flatten(before.aux["ema"]), flatten(student)
    d = row["ema_decay"]
    for k in ("blocks_0/attn/qkv/kernel", "alibi_scale", "context_encoder/norm/scale"):
        np.testing.assert_allclose(t_after[k], d * t_before[k] + (1 - d) * s_after[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(flatten(aux["decoder"])["proj/bias"].shape, (48,))


@pytest.mark.slow  # ~70 s (8-device subprocess), over the suite budget; test_sharding keeps 1.0 and CTC
def test_d2v_pretrain_data2vec2_on_a_mesh(speech_dir, tmp_path):
    """The same first update on one device and on data=2,fsdp=4 over 8 (fake) devices; --pmap over 8 runs too."""
    import json
    import os
    import subprocess
    import sys

    from test_finetune import write_manifest

    clips = (
        "cards_001",
        "goforward",
        "cards_003",
        "forever",
        "cards_002",
        "cards_004",
        "slt_arctic_a0009",
        "librivox_0880",
    )
    manifest = write_manifest(speech_dir, clips, tmp_path / "eight.tsv")
    losses = {}
    for name, mesh in (("one", None), ("fsdp", "data=2,fsdp=4"), ("pmap", "pmap")):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
        argv = [
            sys.executable,
            "-m",
            "flax_d2v.cli",
            "pretrain",
            "--arch",
            "data2vec2",
            "--train",
            str(manifest),
            "--out",
            str(tmp_path / name),
            "--batch-size",
            "8",
            "--config",
            "tiny",
            "--average-top-k-layers",
            "2",
            "--clone-batch",
            "2",
            "--steps",
            "1",
            "--log-every",
            "1",
            "--no-progress",
            "--no-async-checkpoint",
            "--num-workers",
            "0",  # in this process (worker processes: test_loader_workers, test_resume)
            "--no-export-hf",
            "--min-seconds",
            "0",  # the short cards clips too (pretraining drops clips under 2 s by default, as fairseq)
        ]
        argv += ["--pmap"] if mesh == "pmap" else ["--mesh", mesh or "data=1"]
        if mesh is None:
            env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    np.testing.assert_allclose(losses["fsdp"], losses["one"], rtol=1e-4)
    # pmap: dropout, LayerDrop and mask tokens are drawn per device there, so only close, not equal
    np.testing.assert_allclose(losses["pmap"], losses["one"], rtol=0.05)
