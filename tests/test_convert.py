"""HF <-> Flax conversion: bit-identical round trips, and one-line errors for bad checkpoints."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import flax_d2v
from flax_d2v.cli import main
from flax_d2v.convert import keys

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import perturb_layer_norms, tiny_hf_kwargs  # noqa: E402


def _hf_model(cls_name="Data2VecAudioForCTC", seed=0, **kw):
    torch.manual_seed(seed)
    cls = getattr(transformers, cls_name)
    model = cls(transformers.Data2VecAudioConfig(**tiny_hf_kwargs(**kw))).eval()
    perturb_layer_norms(model, seed)
    return model


def _run_cli(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("cls_name", ["Data2VecAudioForCTC", "Data2VecAudioModel"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_flax_hf_bit_identical(tmp_path, capsys, cls_name, fmt):
    model = _hf_model(cls_name)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    if fmt == "bin":  # transformers 5 always writes safetensors: make the legacy layout by hand
        os.remove(src / "model.safetensors")
        torch.save(model.state_dict(), src / "pytorch_model.bin")
    rc, out, err = _run_cli(["convert", str(src), str(tmp_path / "flax")], capsys)
    assert rc == 0, err
    assert cls_name in out
    rc, out, err = _run_cli(["convert", str(tmp_path / "flax"), str(tmp_path / "back"), "--to", "hf"], capsys)
    assert rc == 0, err
    back, info = getattr(transformers, cls_name).from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original, restored = model.state_dict(), back.state_dict()
    assert set(original) == set(restored)
    for k in original:
        assert torch.equal(original[k], restored[k]), k
    assert (tmp_path / "back" / "preprocessor_config.json").is_file()


def test_vocab_and_processor_files_travel(tmp_path, capsys):
    model = _hf_model()
    src = tmp_path / "hf"
    model.save_pretrained(src)
    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|", *"ETAONIHSRDLUMWCFGYPBVK'XJQZ"])}
    (src / "vocab.json").write_text(json.dumps(vocab))
    assert _run_cli(["convert", str(src), str(tmp_path / "flax")], capsys)[0] == 0
    assert _run_cli(["convert", str(tmp_path / "flax"), str(tmp_path / "back"), "--to", "hf"], capsys)[0] == 0
    assert json.loads((tmp_path / "back" / "vocab.json").read_text()) == vocab


def test_key_table_is_one_table_both_directions():
    module = flax_d2v.Data2VecAudioForCTC(flax_d2v.tiny_config())
    from flax_d2v.modeling import param_shapes

    for path in keys.flatten(param_shapes(module)):
        hf_key, kind = keys.flax_to_hf_key(path)
        assert keys.hf_to_flax_key(hf_key) == (path, kind)


def test_scanned_layout_round_trip_and_same_outputs():
    import jax.numpy as jnp

    config = flax_d2v.tiny_config()
    module = flax_d2v.Data2VecAudioForCTC(config)
    params = flax_d2v.init_params(module, 3)
    stacked = keys.stack_layers(params)
    assert keys.is_scanned(stacked)
    back = keys.unstack_layers(stacked)
    flat_a, flat_b = keys.flatten(params), keys.flatten(back)
    assert set(flat_a) == set(flat_b)
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8000)), jnp.float32)
    scanned = flax_d2v.Data2VecAudioForCTC(config, scan_layers=True)
    a = module.apply({"params": params}, x, output_hidden_states=True)
    b = scanned.apply({"params": stacked}, x, output_hidden_states=True)
    # 1e-5: identical math; scan changes only XLA's fusion decisions.
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=1e-5)
    assert len(b.hidden_states) == config.num_hidden_layers + 1


# ------------------------------------------------------------------ bad input
def _assert_one_line_error(rc, err, *needles):
    assert rc != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("d2v ")]  # progress bars from transformers aside
    assert len(lines) == 1, err
    line = lines[0]
    for n in needles:
        assert n in line, line


def test_missing_config(tmp_path, capsys):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    os.remove(tmp_path / "hf" / "config.json")
    rc, _, err = _run_cli(["convert", str(tmp_path / "hf"), str(tmp_path / "out")], capsys)
    _assert_one_line_error(rc, err, "config.json")
    assert not (tmp_path / "out").exists()


def _write_state(tmp_path: Path, state, config) -> Path:
    from safetensors.torch import save_file

    d = tmp_path
    d.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, d / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(d)
    return d


def test_unknown_missing_and_misshaped_keys(tmp_path, capsys):
    model = _hf_model()
    state = dict(model.state_dict())
    state["encoder.layers.0.attention.rotary.weight"] = torch.zeros(3)
    d = _write_state(tmp_path / "a", state, model.config)
    rc, _, err = _run_cli(["convert", str(d), str(tmp_path / "o1")], capsys)
    _assert_one_line_error(rc, err, "encoder.layers.0.attention.rotary.weight", "unexpected")

    state = dict(model.state_dict())
    del state["data2vec_audio.encoder.layers.1.final_layer_norm.bias"]
    d = _write_state(tmp_path / "b", state, model.config)
    rc, _, err = _run_cli(["convert", str(d), str(tmp_path / "o2")], capsys)
    _assert_one_line_error(rc, err, "encoder.layers.1.final_layer_norm.bias", "missing")

    state = dict(model.state_dict())
    state["data2vec_audio.encoder.layers.0.feed_forward.intermediate_dense.weight"] = torch.zeros(7, 64)
    d = _write_state(tmp_path / "c", state, model.config)
    rc, _, err = _run_cli(["convert", str(d), str(tmp_path / "o3")], capsys)
    _assert_one_line_error(rc, err, "intermediate_dense.weight", "(7, 64)", "(128, 64)")


def test_truncated_safetensors(tmp_path, capsys):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    rc, _, err = _run_cli(["convert", str(tmp_path / "hf"), str(tmp_path / "out")], capsys)
    _assert_one_line_error(rc, err, "model.safetensors")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/d2v_pwned_bin",))


def test_malicious_bin_is_refused_and_nothing_runs(tmp_path, capsys):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    os.remove(tmp_path / "hf" / "model.safetensors")
    marker = Path("/tmp/d2v_pwned_bin")
    marker.unlink(missing_ok=True)
    with open(tmp_path / "hf" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    rc, _, err = _run_cli(["convert", str(tmp_path / "hf"), str(tmp_path / "out")], capsys)
    _assert_one_line_error(rc, err, "pytorch_model.bin")
    assert not marker.exists()


def test_destination_not_overwritten_without_flag(tmp_path, capsys):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    rc, _, err = _run_cli(["convert", str(tmp_path / "hf"), str(dst)], capsys)
    _assert_one_line_error(rc, err, str(dst), "--overwrite")
    assert (dst / "precious.txt").read_text() == "keep me"
    rc, _, err = _run_cli(["convert", str(tmp_path / "hf"), str(dst), "--overwrite"], capsys)
    assert rc == 0, err
    assert not (dst / "precious.txt").exists() and (dst / "flax_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp dirs left


def test_hub_id_fails_offline_with_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(flax_d2v.D2VError, match="facebook/data2vec-audio-base.*offline"):
        flax_d2v.from_pretrained("facebook/data2vec-audio-base")


def test_config_json_round_trip_keeps_every_key(tmp_path):
    model = _hf_model()
    model.save_pretrained(tmp_path / "hf")
    original = json.loads((tmp_path / "hf" / "config.json").read_text())
    config = flax_d2v.Data2VecAudioConfig.from_json_file(tmp_path / "hf" / "config.json")
    again = json.loads(config.to_json_string())
    for k, v in original.items():
        assert again[k] == v, k
