"""`d2v embed`: .npz files of hidden states, preprocessed as the checkpoint says."""

from __future__ import annotations

import numpy as np
import pytest

import flax_d2v
from flax_d2v.checkpoint import save_flax
from flax_d2v.cli import main


@pytest.fixture(scope="module")
def flax_dir(tmp_path_factory):
    config = flax_d2v.tiny_config()
    module = flax_d2v.Data2VecAudioModel(config)
    d = tmp_path_factory.mktemp("m") / "flax"
    save_flax(d, config, flax_d2v.init_params(module, 0))
    return d


def test_embed_all_layers_one_file(flax_dir, tmp_path, speech_dir, capsys):
    import jax.numpy as jnp

    from flax_d2v.audio import load_audio, normalize

    clip = speech_dir / "16k" / "cards_001.wav"
    out = tmp_path / "e.npz"
    assert main(["embed", "--model", str(flax_dir), "--layer", "all", "--out", str(out), str(clip)]) == 0
    z = np.load(out)
    assert sorted(z.files) == ["layer_0", "layer_1", "layer_2"]
    module, params = flax_d2v.from_pretrained(str(flax_dir))
    wave = normalize(load_audio(clip))  # HF normalisation, eps 1e-7
    ref = module.apply({"params": params}, jnp.asarray(wave)[None], output_hidden_states=True)
    for i in range(3):
        assert z[f"layer_{i}"].dtype == np.float32 and z[f"layer_{i}"].shape == ref.hidden_states[i][0].shape
        np.testing.assert_array_equal(z[f"layer_{i}"], np.asarray(ref.hidden_states[i][0]))


def test_embed_several_files_to_directory_and_bad_file(flax_dir, tmp_path, speech_dir, capsys):
    clips = [speech_dir / "16k" / "cards_001.wav", speech_dir / "16k" / "forever.wav"]
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF1234WAVEjunk")
    out = tmp_path / "emb"
    rc = main(["embed", "--model", str(flax_dir), "--layer", "1", "--out", str(out), *map(str, clips), str(bad)])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.wav" in err and "Traceback" not in err
    for c in clips:
        z = np.load(out / (c.stem + ".npz"))
        assert z.files == ["layer_1"] and z["layer_1"].shape[1] == 64


def test_embed_bad_layer(flax_dir, tmp_path, speech_dir, capsys):
    rc = main(
        [
            "embed",
            "--model",
            str(flax_dir),
            "--layer",
            "7",
            "--out",
            str(tmp_path / "x.npz"),
            str(speech_dir / "16k" / "cards_001.wav"),
        ]
    )
    assert rc == 1 and "--layer 7" in capsys.readouterr().err
