"""data2vec 2.0 (audio): parity with the PyTorch rendering of fairseq's model, conversion both ways, teacher.

Checkpoints come from `tests/fairseq2_fixtures.py` (fairseq key names, `_ema`, decoder, CTC wrapper,
perturbed LayerNorms/biases/alibi_scale with one negative head), in the base (12 heads) and large
(16 heads, prenet blocks) layouts at narrow widths.
"""

from __future__ import annotations

import numpy as np
import pytest

import flax_d2v
from flax_d2v.api.verify import PARITY_RTOL
from flax_d2v.cli import main

torch = pytest.importorskip("torch")

import fairseq2_fixtures as F2  # noqa: E402
from fairseq_fixtures import save_checkpoint  # noqa: E402

CLIP = "16k/slt_arctic_a0009.wav"


def _wave(speech_dir, seconds=1.2):
    from flax_d2v.audio import load_audio

    w = load_audio(speech_dir / CLIP)[: int(16000 * seconds)]
    return ((w - w.mean()) / (w.std() + 1e-5)).astype(np.float32)


def _rel(got, ref, mask=None):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    if mask is not None:
        got, ref = got[mask], ref[mask]
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))


def _batch(wave):
    n = len(wave)
    lengths = [n, int(n * 0.7), int(n * 0.45)]
    values = np.zeros((3, n), np.float32)
    mask = np.zeros((3, n), np.int32)
    for i, m in enumerate(lengths):
        values[i, :m], mask[i, :m] = wave[:m], 1
    return values, mask


def test_alibi_slopes_fairseq_rule():
    """12 heads: the 8 power-of-two slopes, then every other slope of the 16-head series (fairseq's get_alibi)."""
    from flax_d2v.data2vec2 import alibi_bias, alibi_slopes

    s12 = alibi_slopes(12)
    assert s12[:8] == [2.0 ** -(i + 1) for i in range(8)]
    assert np.allclose(s12[8:], [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5])
    assert np.allclose(alibi_slopes(16), [2.0 ** (-0.5 * (i + 1)) for i in range(16)])
    from flax_d2v.convert.fairseq2_reference import get_alibi_bias

    np.testing.assert_array_equal(np.asarray(alibi_bias(7, 12))[None], get_alibi_bias(1, 7, 12).numpy())


@pytest.mark.parametrize("layout", ["base", "large", pytest.param("base-full", marks=pytest.mark.slow)])
def test_pretrained_parity_every_block_teacher_and_padded_batch(tmp_path, speech_dir, layout):
    ckpt, student, teacher = F2.pretrained_checkpoint(layout)
    pt = save_checkpoint(ckpt, tmp_path / "d2v2.pt")
    module, params = flax_d2v.from_pretrained(pt)
    assert type(module).__name__ == "Data2Vec2Model"
    assert float(np.asarray(params["alibi_scale"]).min()) < 0  # the clamp is exercised
    wave = _wave(speech_dir)
    for values, mask in ((wave[None], None), _batch(wave)):
        pm = None if mask is None else torch.from_numpy(mask == 0)
        ref = student.extract_features(torch.from_numpy(values), pm)
        out = module.apply({"params": params}, values, mask, output_hidden_states=True, output_layer_results=True)
        fm = None if out.frame_mask is None else np.asarray(out.frame_mask)
        if fm is not None:
            assert not fm.all()  # there is padding, and fairseq's output depends on it: compare the padded batch
        for i, (g, r) in enumerate(zip(out.hidden_states, ref["hidden_states"], strict=True)):
            assert _rel(g, r.numpy(), fm) < PARITY_RTOL, (layout, "hidden", i)
        for i, (g, r) in enumerate(zip(out.layer_results, ref["layer_results"], strict=True)):
            assert _rel(g, r.numpy(), fm) < PARITY_RTOL, (layout, "layer_result", i)
        assert len(out.prenet_states) == len(ref["prenet_states"]) == F2.LAYOUTS[layout]["prenet_depth"]
        for i, (g, r) in enumerate(zip(out.prenet_states, ref["prenet_states"], strict=True)):
            assert _rel(g, r.numpy(), fm) < PARITY_RTOL, (layout, "prenet", i)

        # the EMA teacher: its own positional conv, alibi_scale, context encoder, blocks over the student's features
        tmod, tparams = flax_d2v.from_pretrained(pt, teacher=True)
        tref = teacher.extract_features(None, pm, local=ref["local_features"])
        tout = tmod.apply({"params": tparams}, values, mask, output_hidden_states=True, output_layer_results=True)
        for i, (g, r) in enumerate(zip(tout.layer_results, tref["layer_results"], strict=True)):
            assert _rel(g, r.numpy(), fm) < PARITY_RTOL, (layout, "teacher", i)
        assert _rel(tout.last_hidden_state, tref["x"].numpy(), fm) < PARITY_RTOL
        assert _rel(tout.last_hidden_state, ref["x"].numpy(), fm) > 1e-3  # really a different model


def test_padded_frames_change_fairseq_output_and_invariant_path(tmp_path, speech_dir):
    """fairseq's batched output depends on padding (never zeroed); the padding-invariant path does not."""
    from flax_d2v.modeling import apply_padding_invariant

    ckpt, student, _ = F2.pretrained_checkpoint("base")
    module, params = flax_d2v.from_pretrained(save_checkpoint(ckpt, tmp_path / "m.pt"))
    wave = _wave(speech_dir)
    values, mask = _batch(wave)
    m = int(mask[2].sum())
    alone = module.apply({"params": params}, values[2:, :m], None).last_hidden_state
    batched = module.apply({"params": params}, values, mask).last_hidden_state
    n = alone.shape[1]
    assert _rel(batched[2, :n], alone[0]) > 1e-4  # fairseq's own behaviour: padding leaks in
    inv = apply_padding_invariant(module, params, values, mask).last_hidden_state
    np.testing.assert_allclose(np.asarray(inv[2, :n]), np.asarray(alone[0]), rtol=0, atol=2e-5)
    # an all-padding filler row (a short last batch) stays finite: the key mask is finite, not fairseq's -inf
    filler = module.apply({"params": params}, values, mask * np.array([[1], [1], [0]], np.int32)).last_hidden_state
    assert np.isfinite(np.asarray(filler)).all()


@pytest.mark.parametrize("layout", ["base", "large"])
def test_ctc_logits_parity_and_vocab(tmp_path, capsys, speech_dir, layout):
    ckpt, enc, w, b = F2.ctc_checkpoint(layout)
    pt = save_checkpoint(ckpt, tmp_path / "ctc.pt")
    assert main(["convert", str(pt), str(tmp_path / "flax")]) == 0
    assert "Data2Vec2ForCTC" in capsys.readouterr().out
    module, params = flax_d2v.from_pretrained(tmp_path / "flax")
    cfg = module.config
    assert (cfg.mask_time_prob, cfg.mask_feature_prob, cfg.layerdrop) == (0.65, 0.25, 0.1)
    assert (tmp_path / "flax" / "vocab.json").is_file()
    values, mask = _batch(_wave(speech_dir))
    ref = enc.extract_features(torch.from_numpy(values), torch.from_numpy(mask == 0))
    logits_ref = (ref["x"] @ w.T + b).numpy()
    out = module.apply({"params": params}, values, mask)
    assert _rel(out.logits, logits_ref, np.asarray(out.frame_mask)) < PARITY_RTOL


def _flat_state(state):
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("kind", ["pretrained", "ctc"])
def test_round_trip_fairseq_flax_fairseq_bit_identical(tmp_path, capsys, kind):
    from flax_d2v.convert.fairseq import read_fairseq_file

    ckpt = F2.pretrained_checkpoint("large")[0] if kind == "pretrained" else F2.ctc_checkpoint("base")[0]
    pt = save_checkpoint(ckpt, tmp_path / "in.pt")
    assert main(["convert", str(pt), str(tmp_path / "flax")]) == 0
    assert main(["convert", str(tmp_path / "flax"), str(tmp_path / "out.pt"), "--to", "fairseq"]) == 0
    back = read_fairseq_file(tmp_path / "out.pt")
    a, b = _flat_state(ckpt["model"]), _flat_state(back["model"])
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert back["cfg"] == ckpt["cfg"]
    if kind == "pretrained":
        assert "_ema" in back["model"] and any(".decoder." in k for k in back["model"])
    else:
        assert back["task_state"]["target_dictionary"].symbols == ckpt["task_state"]["target_dictionary"].symbols
    # and it reads again (the exported file is a valid input)
    module, _ = flax_d2v.from_pretrained(tmp_path / "out.pt")
    assert module.config.num_attention_heads == ckpt["cfg"]["model"].get("num_heads", 0) or kind == "ctc"


def test_teacher_for_1_0_pretraining_checkpoints(tmp_path):
    """`teacher=True` on a data2vec 1.0 `.pt`: the `_ema` encoder over the student's conv features."""
    pytest.importorskip("transformers")
    import fairseq_fixtures as F

    model = F.hf_model(False)
    ckpt = F.checkpoint(model, False)
    pt = F.save_checkpoint(ckpt, tmp_path / "v1.pt")
    smod, sp = flax_d2v.from_pretrained(pt)
    tmod, tp = flax_d2v.from_pretrained(pt, teacher=True)
    np.testing.assert_array_equal(
        tp["feature_extractor"]["conv_layers_0"]["conv"]["kernel"],
        sp["feature_extractor"]["conv_layers_0"]["conv"]["kernel"],
    )
    np.testing.assert_array_equal(
        tp["encoder"]["layers_1"]["feed_forward"]["intermediate_dense"]["kernel"],
        ckpt["model"]["_ema"]["layers.1.fc1.weight"].numpy().T,
    )
    x = np.random.default_rng(0).standard_normal((1, 8000)).astype(np.float32)
    assert (
        tmod.apply({"params": tp}, x).last_hidden_state.shape == smod.apply({"params": sp}, x).last_hidden_state.shape
    )
    with pytest.raises(flax_d2v.D2VError, match="no EMA teacher"):
        flax_d2v.from_pretrained(
            F.save_checkpoint(F.checkpoint(model, False, ema=False), tmp_path / "noema.pt"), teacher=True
        )


def test_refusals(tmp_path):
    ckpt, _, _ = F2.pretrained_checkpoint("base")
    bad = F2.clone(ckpt)
    bad["model"]["blocks.0.attn.qkv.weight"] = bad["model"]["blocks.0.attn.qkv.weight"][:-1]
    with pytest.raises(flax_d2v.D2VError, match=r"blocks\.0\.attn\.qkv\.weight.*shape"):
        flax_d2v.from_pretrained(save_checkpoint(bad, tmp_path / "bad.pt"))
    bad = F2.clone(ckpt)
    bad["cfg"]["model"]["layer_norm_first"] = True
    with pytest.raises(flax_d2v.D2VError, match="layer_norm_first"):
        flax_d2v.from_pretrained(save_checkpoint(bad, tmp_path / "bad2.pt"))
    pt = save_checkpoint(ckpt, tmp_path / "ok.pt")
    assert main(["convert", str(pt), str(tmp_path / "ok")]) == 0
    assert main(["convert", str(tmp_path / "ok"), str(tmp_path / "hf"), "--to", "hf"]) != 0  # no transformers class
    assert not (tmp_path / "hf").exists()
    bad = F2.clone(ckpt)
    bad["model"]["blocks.0.extra"] = torch.zeros(1)
    with pytest.raises(flax_d2v.D2VError, match="unexpected key"):
        flax_d2v.from_pretrained(save_checkpoint(bad, tmp_path / "bad3.pt"))


@pytest.mark.parametrize("kind", ["ctc-pt", "pretrained-dir"])
def test_verify_uses_pytorch_rendering_when_fairseq_is_missing(tmp_path, capsys, kind):
    if kind == "ctc-pt":
        src = save_checkpoint(F2.ctc_checkpoint("large")[0], tmp_path / "ctc.pt")
        stages = ("local_features", "prenet[1]", "hidden_states[2]", "layer_results[1]", "logits")
    else:
        pt = save_checkpoint(F2.pretrained_checkpoint("base")[0], tmp_path / "pre.pt")
        assert main(["convert", str(pt), str(tmp_path / "dir")]) == 0
        src = tmp_path / "dir"
        stages = ("local_features", "hidden_states[3]", "layer_results[2]")
    capsys.readouterr()
    rc = main(["verify", str(src), "--report", str(tmp_path / "r.md")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "fairseq2_reference" in out and "fairseq is not importable" in out
    assert "fairseq2_reference" in (tmp_path / "r.md").read_text()
    for stage in stages:
        assert f"| {stage} |" in out
    assert "FAIL" not in out.replace("PASS", "")


def test_embed_and_transcribe_on_2_0(tmp_path, capsys, speech_dir):
    """`d2v embed` (every block) and `d2v transcribe` (padding-invariant, bucketed) on a converted 2.0 CTC model."""
    ckpt = F2.ctc_checkpoint("base")[0]
    pt = save_checkpoint(ckpt, tmp_path / "ctc.pt")
    assert main(["convert", str(pt), str(tmp_path / "m")]) == 0
    clip = speech_dir / CLIP
    assert (
        main(["embed", "--model", str(tmp_path / "m"), str(clip), "--layer", "all", "--out", str(tmp_path / "e.npz")])
        == 0
    )
    arrays = np.load(tmp_path / "e.npz")
    assert len(arrays.files) == F2.LAYOUTS["base"]["depth"] + 1
    capsys.readouterr()
    from flax_d2v.api.transcribe import Transcriber

    tr = Transcriber(str(tmp_path / "m"), batch_size=4)
    wave = _wave(speech_dir, 2.0)
    alone = tr([(wave[:20000], 16000)], progress=False)
    together = tr([(wave[:20000], 16000), (wave, 16000), (wave[:9000], 16000)], progress=False)
    assert alone[0].text == together[0].text  # a clip's transcript does not depend on its batch-mates


def test_finetune_2_0_from_fairseq_pt(tmp_path, speech_dir):
    """`d2v finetune --model x.pt` on a data2vec 2.0 pretrained checkpoint: CTC head added, loss falls, RUN/flax."""
    import jax
    from test_finetune import OVERFIT_CLIPS, write_manifest

    from flax_d2v.commands.finetune import resolve
    from flax_d2v.train import finetune

    pt = save_checkpoint(F2.pretrained_checkpoint("base")[0], tmp_path / "base_libri.pt")
    manifest = write_manifest(speech_dir, OVERFIT_CLIPS, tmp_path / "four.tsv")
    result = finetune(
        resolve(
            dict(
                train=str(manifest),
                model=str(pt),
                out=str(tmp_path / "run"),
                steps=30,
                batch_size=4,
                learning_rate=2e-3,
                lr_schedule="constant",
                dropout=0.0,
                mask_time_prob=0.5,
                mask_time_length=5,
                log_every=1,
                progress=False,
                seed=0,
            )
        )
    )
    params = jax.device_get(result.state.params)
    assert set(params["data2vec_audio"]) >= {"alibi_scale", "context_encoder", "blocks_0", "project_features"}
    from flax_d2v.train.metrics import read_metrics

    train = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    first, last = train[0]["loss"], min(r["loss"] for r in train[-5:])
    assert last < 0.5 * first, (first, last)
    module, loaded = flax_d2v.from_pretrained(tmp_path / "run" / "flax")
    assert type(module).__name__ == "Data2Vec2ForCTC"
    np.testing.assert_array_equal(loaded["lm_head"]["kernel"], params["lm_head"]["kernel"])
