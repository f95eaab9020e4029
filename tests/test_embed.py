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


# An x-vector through `d2v embed` (padded to its bucket) vs the clip alone through `apply`: float32
# noise, measured 3.4e-7 of the largest value (tests/test_classify.py's XVECTOR_PADDING_RTOL, its bound).
XVECTOR_RTOL = 5e-6
# bf16 against float32 x-vectors of the tiny model below: cosine 0.99998 measured (CPU); a bound well under it
BF16_COSINE = 0.999


def test_embed_xvector_honours_precision_and_normalize_eps(tmp_path, speech_dir):
    """`--precision` reaches the x-vector model, and the audio is normalised with the eps that the
    model's preprocessor_config.json records (1e-2 here: far from transformers' 1e-7, so it shows)."""
    import json

    import jax
    import jax.numpy as jnp

    from flax_d2v.audio import load_audio, normalize
    from flax_d2v.classify import cosine
    from flax_d2v.heads import Data2VecAudioForXVector

    config = flax_d2v.tiny_config(tdnn_dim=(32, 48), tdnn_kernel=(5, 1), tdnn_dilation=(2, 1), xvector_output_dim=24)
    module = Data2VecAudioForXVector(config)
    params = jax.tree_util.tree_map_with_path(  # head weights above the 0.02 init (see tests/test_heads.py)
        lambda path, p: p * 20.0 if path[0].key != "data2vec_audio" and p.ndim == 2 else p,
        flax_d2v.init_params(module, 0),
    )
    model = tmp_path / "xv"
    pre = json.dumps({"do_normalize": True, "normalize_eps": 1e-2})
    save_flax(model, config, params, extra_files={"preprocessor_config.json": pre})
    clip = str(speech_dir / "16k" / "cards_001.wav")
    got = {}
    for precision in ("highest", "bf16"):
        out = tmp_path / f"{precision}.npz"
        assert (
            main(["embed", "--xvector", "--precision", precision, "--model", str(model), "--out", str(out), clip]) == 0
        )
        got[precision] = np.load(out)["xvector"]
    want = np.asarray(
        module.apply({"params": params}, jnp.asarray(normalize(load_audio(clip), 1e-2))[None]).embeddings[0]
    )
    scale = np.abs(want).max()
    np.testing.assert_allclose(got["highest"], want, rtol=0, atol=XVECTOR_RTOL * scale)
    # bf16 computed in bf16: far from float32's result, yet the same model's embedding
    assert np.abs(got["bf16"] - got["highest"]).max() > 1e3 * XVECTOR_RTOL * scale
    assert cosine(got["bf16"], got["highest"]) > BF16_COSINE
