"""The data2vec 2.0 pretraining recipe: a fairseq checkpoint's objective continues (its cfg is the default,
a flag wins), options we do not implement are refused, `ema_encoder_only`, the 2.0 dropouts, the other
architecture's settings refused, resumes checked, and the large recipe's optimizer (fairseq's no-decay
groups, `clip_norm`). Uses `../shared/fairseq-objective/data2vec2_pretrained_tiny.pt.xz`, a checkpoint
fairseq's own training loop wrote.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flax_d2v.errors import D2VError

torch = pytest.importorskip("torch")

REAL_V2 = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "fairseq-objective" / "data2vec2_pretrained_tiny.pt.xz"
)


@pytest.fixture(scope="module")
def real_v2(tmp_path_factory) -> Path:
    if not REAL_V2.is_file():
        pytest.skip(f"{REAL_V2} not found")
    out = tmp_path_factory.mktemp("real_v2") / "d2v2_tiny.pt"
    with lzma.open(REAL_V2) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def _variant(real: Path, out: Path, model: dict | None = None, audio: dict | None = None, **top) -> Path:
    """The real checkpoint with cfg.model (and cfg.model.modalities.audio) entries changed."""
    from flax_d2v.convert.fairseq_common import _jsonable, read_fairseq_file

    ck = read_fairseq_file(real)
    cfg = _jsonable(ck["cfg"])
    cfg["model"].update(model or {})
    cfg["model"]["modalities"]["audio"].update(audio or {})
    for k, v in top.items():
        cfg[k].update(v)
    ck["cfg"] = cfg
    if cfg["model"].get("ema_encoder_only"):  # fairseq's EMAModule(model.blocks): keys "N.*"
        ema = ck["model"]["_ema"]
        ck["model"]["_ema"] = {k[len("blocks.") :]: v for k, v in ema.items() if k.startswith("blocks.")}
    torch.save(ck, out)
    return out


def _plan(monkeypatch, tmp_path, **settings):
    """The run's `Plan` of `train.pretrain(settings)` (the training itself not run)."""
    from flax_d2v.train import pretrain_run

    seen = {}
    monkeypatch.setattr(pretrain_run, "_run", lambda plan: seen.setdefault("plan", plan))
    base = dict(train="unused.tsv", out=str(tmp_path / "run"), steps=10, batch_size=2, arch="data2vec2")
    pretrain_run.pretrain({**base, **settings})
    return seen["plan"]


# -------------------------------------------------- item 8: the checkpoint's objective
LARGE_LIKE = dict(
    clone_batch=3,
    average_top_k_layers=1,
    ema_decay=0.9997,
    ema_end_decay=1.0,
    ema_anneal_end_step=300000,
    instance_norm_target_layer=False,
    loss_beta=0.25,
    layerdrop=0.0,
)
LARGE_LIKE_AUDIO = dict(mask_prob=0.55, mask_prob_adjust=0.1, mask_length=4, mask_dropout=0.1)


def test_checkpoint_objective_is_the_default_and_a_flag_wins(real_v2, tmp_path, monkeypatch, capsys):
    from flax_d2v.train import run_common as common

    composite = {"optimization": {"clip_norm": 1.0}, "optimizer": {"_name": "composite", "groups": {}}}
    pt = _variant(real_v2, tmp_path / "v.pt", LARGE_LIKE, LARGE_LIKE_AUDIO, **composite)
    plan = _plan(monkeypatch, tmp_path, model=str(pt))
    c = plan.objective.config
    for k, v in {**LARGE_LIKE, **LARGE_LIKE_AUDIO}.items():
        if k != "layerdrop":
            assert getattr(c, k) == v, k
    assert plan.config.layerdrop == 0.0  # the checkpoint's model dropouts, not 1.0's 0.05
    assert c.ema_start_update == 4  # the checkpoint's num_updates
    # item 13: a large checkpoint's optimizer (composite: fairseq's no-decay groups; clip_norm 1) continues too
    assert (plan.cfg.clip_norm, plan.cfg.weight_decay_exempt) == (1.0, True)
    # item 12: a 2.0 run records what a resume must repeat, as 1.0
    recorded = common.resume_settings(plan.cfg, plan.resume_keys)
    for flag in ("--batch-size", "--seed", "--crop", "--ema-encoder-only", "--weight-decay-exempt"):
        assert flag in recorded, flag
    err = capsys.readouterr().err
    line = next(s for s in err.splitlines() if "from the checkpoint" in s)
    assert "clone_batch 3" in line and "mask_prob 0.55" in line
    # a flag given wins; the rest still comes from the checkpoint; the log says which
    plan = _plan(monkeypatch, tmp_path, model=str(pt), clone_batch=5, ema_end_decay=0.9999)
    c = plan.objective.config
    assert (c.clone_batch, c.ema_end_decay, c.average_top_k_layers, c.mask_prob) == (5, 0.9999, 1, 0.55)
    err = capsys.readouterr().err
    line = next(s for s in err.splitlines() if "given, over the checkpoint" in s)
    assert "--clone-batch 5 (checkpoint: 3)" in line and "--ema-end-decay 0.9999 (checkpoint: 1)" in line


# -------------------------------------------------- item 11: options we do not implement
UNSUPPORTED = [
    ({"layer_norm_target_layer": True}, {}, "layer_norm_target_layer"),
    ({"layer_norm_targets": True}, {}, "layer_norm_targets"),
    ({"instance_norm_targets": True}, {}, "instance_norm_targets"),
    ({"batch_norm_target_layer": True}, {}, "batch_norm_target_layer"),
    ({"end_of_block_targets": True}, {}, "end_of_block_targets"),
    ({"end_drop_path_rate": 0.1}, {}, "end_drop_path_rate"),
    ({}, {"start_drop_path_rate": 0.1}, "start_drop_path_rate"),
    ({}, {"learned_alibi_scale": False}, "learned_alibi_scale"),
    ({}, {"mask_prob_min": 0.3}, "mask_prob_min"),
    ({}, {"keep_masked_pct": 0.1}, "keep_masked_pct"),
]


@pytest.mark.parametrize("model,audio,name", UNSUPPORTED, ids=[u[2] for u in UNSUPPORTED])
def test_checkpoint_options_we_do_not_implement_are_refused(real_v2, tmp_path, monkeypatch, model, audio, name):
    pt = _variant(real_v2, tmp_path / "v.pt", model, audio)
    with pytest.raises(D2VError, match=name) as e:  # (top-k given: today's code would stop at its default 8)
        _plan(monkeypatch, tmp_path, model=str(pt), average_top_k_layers=2)
    assert "\n" not in str(e.value)


def test_ema_encoder_only_checkpoint_continues_with_a_blocks_only_teacher(real_v2, tmp_path, monkeypatch):
    pt = _variant(real_v2, tmp_path / "v.pt", {"ema_encoder_only": True})
    plan = _plan(monkeypatch, tmp_path, model=str(pt), average_top_k_layers=2)
    assert plan.objective.config.ema_encoder_only
    assert set(plan.teacher) == {"blocks_0", "blocks_1"}
    assert set(plan.objective.teacher_of(plan.params["model"])) == {"blocks_0", "blocks_1"}


def test_ema_encoder_only_teacher_is_the_ema_blocks_on_the_students_context_encoder():
    """fairseq (`ema_encoder_only`): the EMA covers the blocks only; the teacher's input goes through the
    student's positional conv, alibi_scale and context encoder (`contextualized_features`)."""
    from flax_d2v.data2vec2 import Data2Vec2Model, tiny_config_v2
    from flax_d2v.modeling import init_params
    from flax_d2v.train.data2vec2_objective import Data2Vec2Objective, Data2Vec2PretrainConfig

    config = tiny_config_v2(prenet_depth=1)
    m = Data2Vec2Model(config)
    student = init_params(m, 0)
    other = init_params(m, 1)  # stands in for the EMA blocks
    obj = Data2Vec2Objective(m, Data2Vec2PretrainConfig(average_top_k_layers=2, ema_encoder_only=True))
    extra = obj.init_extra({"model": student})
    assert set(extra["teacher"]) == {"blocks_0", "blocks_1"}
    extra = {"teacher": {k: other[k] for k in extra["teacher"]}}
    local = jax.random.normal(jax.random.PRNGKey(2), (2, 40, config.hidden_size))
    got = jax.jit(lambda p, e, x: obj.targets({"model": p}, e, x, deterministic=True))(student, extra, local)
    merged = {**student, "blocks_0": other["blocks_0"], "blocks_1": other["blocks_1"]}
    full = Data2Vec2Objective(m, Data2Vec2PretrainConfig(average_top_k_layers=2))
    want = jax.jit(lambda p, x: full.targets({"model": p}, full.init_extra({"model": p}), x))(merged, local)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the EMA step moves the blocks only
    moved = jax.tree.map(lambda x: x + 1.0, student)
    new = obj.update_extra(extra, {"model": moved}, jnp.asarray(0))
    assert set(new["teacher"]) == {"blocks_0", "blocks_1"}
    d = float(obj.ema_decay(1))
    k = new["teacher"]["blocks_0"]["norm1"]["scale"]
    np.testing.assert_allclose(
        k, d * other["blocks_0"]["norm1"]["scale"] + (1 - d) * moved["blocks_0"]["norm1"]["scale"]
    )


# -------------------------------------------------- item 9: 2.0 keeps its own dropouts
def test_data2vec2_keeps_the_models_dropouts():
    from flax_d2v.data2vec2 import large_config_v2
    from flax_d2v.train.recipes import PretrainConfig

    cfg = PretrainConfig(arch="data2vec2", train="a.tsv", out="o", steps=5, batch_size=2, preset="large")
    large = large_config_v2()
    assert large.replace(**cfg.regularisation()).layerdrop == 0.0  # large_audio_only_task.yaml: layerdrop 0
    given = cfg.replace(layerdrop=0.1, dropout=0.2).regularisation()
    assert given == {"layerdrop": 0.1, "hidden_dropout": 0.2, "attention_dropout": 0.2, "activation_dropout": 0.2}
    v1 = PretrainConfig(train="a.tsv", out="o", steps=5, batch_size=2, preset="base")
    assert v1.regularisation()["layerdrop"] == 0.05  # 1.0: base_librispeech.yaml's


# -------------------------------------------------- item 10: the other architecture's settings
OTHER_ARCH = [
    ("data2vec", ["--clone-batch", "2"], "--clone-batch"),
    ("data2vec", ["--inverse-mask"], "--inverse-mask"),
    ("data2vec", ["--mask-prob-adjust", "0.1"], "--mask-prob-adjust"),
    ("data2vec", ["--mask-dropout", "0.1"], "--mask-dropout"),
    ("data2vec2", ["--no-ema-layers-only"], "--ema-layers-only"),
    ("data2vec2", ["--require-same-masks"], "--require-same-masks"),
    ("data2vec2", ["--instance-norm-over-padding"], "--instance-norm-over-padding"),
]


@pytest.mark.parametrize("arch,argv,flag", OTHER_ARCH, ids=[o[2] for o in OTHER_ARCH])
def test_settings_of_the_other_architecture_are_refused(arch, argv, flag, tmp_path):
    from flax_d2v.commands import pretrain as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    base = ["--train", "a.tsv", "--out", "o", "--steps", "5", "--batch-size", "2", "--preset", "tiny"]
    with pytest.raises(D2VError, match=flag) as e:
        command.resolve(parser.parse_args([*base, "--arch", arch, *argv]))
    assert "\n" not in str(e.value)
    # the same in a run.json
    key = flag[2:].replace("-", "_")
    value = argv[1] if len(argv) > 1 else not argv[0].startswith("--no-")
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({key: value, "arch": arch}))
    with pytest.raises(D2VError, match=flag):
        command.resolve(parser.parse_args([*base, "--config", str(run_json)]))
    # left unset, the architecture runs
    assert command.resolve(parser.parse_args([*base, "--arch", arch])).arch == arch


# -------------------------------------------------- item 12: 2.0 resumes are checked
@pytest.mark.slow
def test_data2vec2_resume_with_other_settings_is_refused(tmp_path):
    from synth_speech import write_corpus

    from flax_d2v.train import pretrain

    manifest = write_corpus(tmp_path / "data", 4, seconds=0.6)
    settings = dict(
        arch="data2vec2",
        train=str(manifest),
        out=str(tmp_path / "run"),
        preset="tiny",
        steps=1,
        batch_size=2,
        average_top_k_layers=2,
        clone_batch=2,
        min_seconds=0.0,
        num_workers=1,
        progress=False,
        async_checkpoint=False,
        export_hf=False,
    )
    pretrain(settings)
    with pytest.raises(D2VError, match=r"started with --batch-size 2, this command gives 4") as e:
        pretrain({**settings, "steps": 2, "batch_size": 4})
    assert "\n" not in str(e.value)
    with pytest.raises(D2VError, match=r"started with --seed 0, this command gives 1"):
        pretrain({**settings, "steps": 2, "seed": 1})


# -------------------------------------------------- item 13: the large recipe's optimizer
def _groups(opt_state) -> dict[str, set[str]]:
    """{optimizer group: the param paths it holds Adam moments for}, read off optax's multi_transform state
    (a group keeps a `MaskedNode` where a param is not its own)."""
    (mt,) = [x for x in opt_state if isinstance(x, optax.MultiTransformState)]
    out = {}
    for label, state in mt.inner_states.items():
        adam = [
            x
            for x in jax.tree.leaves(state.inner_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
            if isinstance(x, optax.ScaleByAdamState)
        ]
        if not adam:  # set_to_zero: no moments
            continue
        flat = jax.tree_util.tree_flatten_with_path(adam[0].mu, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
        paths = {"/".join(str(k.key) for k in p) for p, leaf in flat if not isinstance(leaf, optax.MaskedNode)}
        if paths:
            out[label] = paths
    return out


def test_large_recipe_is_fairseqs_no_decay_groups_and_clip_norm():
    from flax_d2v.data2vec2 import Data2Vec2Model, large_config_v2, tiny_config_v2
    from flax_d2v.modeling import init_params
    from flax_d2v.params import flatten
    from flax_d2v.train import pretrain_run
    from flax_d2v.train import run_common as common
    from flax_d2v.train.data2vec2_objective import Data2Vec2Objective, Data2Vec2PretrainConfig
    from flax_d2v.train.recipes import PretrainConfig
    from flax_d2v.train.state import make_optimizer

    cfg = PretrainConfig(arch="data2vec2", train="a.tsv", out="o", steps=600, batch_size=2, preset="large")
    large = pretrain_run.resolve_v2(cfg, large_config_v2(), None)[0]
    # v2/large_audio_only_task.yaml
    assert (large.clip_norm, large.weight_decay_exempt, large.learning_rate, large.warmup_steps) == (
        1.0,
        True,
        4e-4,
        10,
    )
    assert (large.clone_batch, large.average_top_k_layers, large.mask_prob, large.mask_prob_adjust) == (
        12,
        16,
        0.55,
        0.1,
    )
    assert (large.ema_decay, large.ema_end_decay, large.ema_anneal_end_step) == (0.9997, 1.0, 300000)
    base = pretrain_run.resolve_v2(cfg.replace(preset="base"), tiny_config_v2(), None)[0]
    assert (base.clip_norm, base.weight_decay_exempt, base.learning_rate) == (0.0, False, 7.5e-4)
    # the groups, read off the optimizer state (a tiny model, the large recipe's optimizer)
    m = Data2Vec2Model(tiny_config_v2())
    obj = Data2Vec2Objective(m, Data2Vec2PretrainConfig(average_top_k_layers=2))
    params = obj.init_params(init_params(m, 0), jax.random.PRNGKey(1))
    _, tx = common.make_schedule_and_optimizer(large, params)
    state = tx.init(params)
    groups = _groups(state)
    flat = flatten(params)
    # fairseq: len(p.shape) == 1 or the name ends with .bias or holds alibi_scale
    exempt = {p for p, v in flat.items() if np.ndim(v) == 1 or p.endswith("bias") or "alibi_scale" in p}
    assert groups == {"trainable": set(flat) - exempt, "trainable_no_decay": exempt}
    assert {"model/alibi_scale", "model/blocks_0/norm1/scale", "decoder/proj/bias"} <= exempt
    assert "model/blocks_0/attn/qkv/kernel" not in exempt and "decoder/proj/kernel" not in exempt
    # one update with zero gradients (at a constant lr): only weight decay moves a param, so only the decayed move
    tx1 = make_optimizer(
        params, optax.constant_schedule(1e-2), weight_decay=0.01, weight_decay_exempt=True, freeze_feature_encoder=False
    )
    new = jax.jit(lambda p: optax.apply_updates(p, tx1.update(jax.tree.map(jnp.zeros_like, p), tx1.init(p), p)[0]))(
        params
    )
    moved = {p for p, v in flatten(new).items() if not np.array_equal(v, flat[p])}
    assert moved == {p for p in set(flat) - exempt if np.any(flat[p])}
    # the base recipe decays everything (base_audio_only_task.yaml: plain adam)
    _, tx = common.make_schedule_and_optimizer(base, params)
    assert _groups(tx.init(params)) == {"trainable": set(flat)}
