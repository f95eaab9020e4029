"""Every data2vec-audio head transformers has: conversion both ways, loading, and parity on real speech.

Each case is a random-weight transformers checkpoint (tiny config) with perturbed LayerNorms and
biases, and head weights scaled up so that the head's outputs depend on the audio (with the
default 0.02 init, a classifier's logits are its bias to float32 rounding, and a parity check on
them could not fail).
"""

from __future__ import annotations

import numpy as np
import pytest

from flax_d2v.api.verify import PARITY_RTOL

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import perturb_layer_norms, tiny_hf_kwargs  # noqa: E402

CLIPS = ["16k/librivox_0880.wav", "16k/cards_001.wav", "16k/slt_arctic_a0009.wav"]
HEAD_KW = dict(
    num_labels=3,
    classifier_proj_size=16,
    tdnn_dim=(32, 32, 48),
    tdnn_kernel=(3, 3, 1),
    tdnn_dilation=(1, 2, 1),
    xvector_output_dim=24,
)
# (architecture, use_weighted_layer_sum, adapter)
CASES = [
    ("Data2VecAudioForSequenceClassification", False, False),
    ("Data2VecAudioForSequenceClassification", True, False),
    ("Data2VecAudioForAudioFrameClassification", False, False),
    ("Data2VecAudioForAudioFrameClassification", True, False),
    ("Data2VecAudioForXVector", False, False),
    ("Data2VecAudioForXVector", True, False),
    ("Data2VecAudioForXVector", False, True),
    ("Data2VecAudioModel", False, True),
    ("Data2VecAudioForCTC", False, True),
]
HEAD_OUTPUTS = {
    "Data2VecAudioForSequenceClassification": {"logits"},
    "Data2VecAudioForAudioFrameClassification": {"logits"},
    "Data2VecAudioForXVector": {"logits", "embeddings"},
    "Data2VecAudioForCTC": {"logits", "last_hidden_state"},
    "Data2VecAudioModel": {"last_hidden_state"},
}


def make_hf(path, arch: str, weighted: bool = False, adapter: bool = False, seed: int = 0, **extra):
    """A tiny random transformers checkpoint of `arch`, saved to `path`; returns the torch model."""
    kw = tiny_hf_kwargs(**HEAD_KW, use_weighted_layer_sum=weighted)
    if adapter:  # a narrower output width, so the adapter's proj + proj_layer_norm are exercised
        kw.update(add_adapter=True, num_adapter_layers=2, output_hidden_size=48)
        if arch == "Data2VecAudioForXVector":  # transformers' x-vector projector reads hidden_size features
            kw.update(output_hidden_size=kw["hidden_size"])
    kw.update(extra)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(transformers.Data2VecAudioConfig(**kw)).eval()
    perturb_layer_norms(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "layer_weights":  # away from uniform, so the softmax weighting matters
                p.copy_(torch.randn(p.shape, generator=g))
            elif not name.startswith("data2vec_audio.") and name.endswith("weight") and p.ndim == 2:
                p.mul_(20.0)  # head weights well above the 0.02 init (see the module docstring)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("arch,weighted,adapter", CASES)
def test_head_converts_round_trips_and_matches_pytorch(tmp_path, capsys, speech_dir, arch, weighted, adapter):
    from flax_d2v.api.pretrained import from_pretrained
    from flax_d2v.api.verify import verify
    from flax_d2v.cli import main

    model = make_hf(tmp_path / "hf", arch, weighted, adapter)
    # HF -> Flax -> HF: transformers loads it with nothing missing, unexpected or mismatched, bit for bit
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "flax")]) == 0
    assert arch in capsys.readouterr().out
    module, _ = from_pretrained(tmp_path / "flax")
    assert type(module).__name__ == arch
    assert main(["convert", str(tmp_path / "flax"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back, info = getattr(transformers, arch).from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original, restored = model.state_dict(), back.state_dict()
    assert set(original) == set(restored)
    for k in original:
        assert torch.equal(original[k], restored[k]), k
    # Parity on real speech: one clip and a padded batch, every hidden state and the head's outputs
    rows, facts = verify(str(tmp_path / "flax"), [str(speech_dir / c) for c in CLIPS])
    assert facts["architecture"] == arch
    stages = {r.stage for r in rows}
    assert HEAD_OUTPUTS[arch] <= stages, stages
    assert f"hidden_states[{model.config.num_hidden_layers}]" in stages
    assert {r.case for r in rows} == {"single: librivox_0880.wav", "padded batch of 3"}
    bad = [(r.case, r.stage, r.rel) for r in rows if not r.passed]
    assert not bad, bad
    assert max(r.rel for r in rows) <= PARITY_RTOL


def test_head_outputs_depend_on_the_audio(tmp_path, speech_dir):
    """The scaled heads make parity meaningful: logits differ clip to clip far beyond the tolerance."""
    import jax.numpy as jnp

    from flax_d2v.api.pretrained import from_pretrained
    from flax_d2v.audio import load_audio, pad_batch

    make_hf(tmp_path / "hf", "Data2VecAudioForSequenceClassification")
    module, params = from_pretrained(tmp_path / "hf")
    values, mask = pad_batch([load_audio(speech_dir / c) for c in CLIPS])
    logits = np.asarray(module.apply({"params": params}, jnp.asarray(values), jnp.asarray(mask)).logits)
    spread = np.abs(logits - logits.mean(0)).max()
    assert spread > 1e3 * PARITY_RTOL * np.abs(logits).max()


def test_classifier_heads_refuse_the_adapter(tmp_path):
    """As transformers: sequence / frame classification with add_adapter=True is a clear error; so is an
    x-vector adapter of another width (transformers' x-vector fails on it with a shape error)."""
    import flax_d2v
    from flax_d2v.heads import Data2VecAudioForSequenceClassification, Data2VecAudioForXVector
    from flax_d2v.modeling import init_params

    with pytest.raises(flax_d2v.D2VError, match="adapter"):
        init_params(Data2VecAudioForSequenceClassification(flax_d2v.tiny_config(add_adapter=True)))
    # x-vectors take the adapter at the encoder's width only: transformers' projector reads hidden_size
    with pytest.raises(flax_d2v.D2VError, match="output_hidden_size == hidden_size"):
        init_params(Data2VecAudioForXVector(flax_d2v.tiny_config(add_adapter=True, output_hidden_size=48)))


def test_freeze_base_model_stops_gradients_into_the_encoder():
    """transformers' `freeze_base_model()` freezes `data2vec_audio.*` only: every other group, the
    softmaxed `layer_weights` of the weighted layer sum included, still gets a gradient. Checked group
    by group (a max over all head gradients would hide one group at zero)."""
    import jax
    import jax.numpy as jnp

    import flax_d2v
    from flax_d2v.heads import REGISTRY
    from flax_d2v.modeling import init_params

    arch = "Data2VecAudioForXVector"  # the head with most groups: projector, tdnn_*, feature_extractor, ...
    config = flax_d2v.tiny_config(
        use_weighted_layer_sum=True, tdnn_dim=(8, 8), tdnn_kernel=(3, 1), tdnn_dilation=(2, 1), xvector_output_dim=8
    )
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8000))
    for frozen in (False, True):
        module = REGISTRY[arch].build(config, freeze_base_model=frozen)
        params = init_params(module, 0)
        grads = jax.jit(jax.grad(lambda p, m=module: m.apply({"params": p}, x).logits.sum()))(params)
        # the largest |gradient| of each top-level group (`objective` is the AM-softmax loss's, unused here)
        by_group = {k: max(float(jnp.abs(v).max()) for v in jax.tree.leaves(g)) for k, g in grads.items()}
        by_group.pop("objective", None)
        assert "layer_weights" in by_group
        heads = {k: v for k, v in by_group.items() if k != "data2vec_audio"}
        assert all(v > 0 for v in heads.values()), (frozen, heads)
        assert (by_group["data2vec_audio"] == 0) == frozen, (frozen, by_group["data2vec_audio"])


def test_am_softmax_matches_transformers():
    import jax.numpy as jnp
    from transformers.models.data2vec.modeling_data2vec_audio import AMSoftmaxLoss

    from flax_d2v.heads import am_softmax_loss

    torch.manual_seed(0)
    ref = AMSoftmaxLoss(8, 5)
    logits = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 1])
    with torch.no_grad():
        want = float(ref(logits, labels))
    got = float(
        jnp.mean(
            am_softmax_loss(
                jnp.asarray(logits.numpy()), jnp.asarray(ref.weight.detach().numpy()), jnp.asarray(labels.numpy())
            )
        )
    )
    assert abs(got - want) <= 1e-5 * abs(want)


def test_registry_rows_are_one_table_both_directions():
    import flax_d2v
    from flax_d2v.convert import keys
    from flax_d2v.heads import REGISTRY
    from flax_d2v.modeling import param_shapes

    for spec in REGISTRY.values():
        extra = (
            {"add_adapter": True, "output_hidden_size": 48}
            if spec.architecture in ("Data2VecAudioModel", "Data2VecAudioForCTC")
            else {"use_weighted_layer_sum": True}
        )
        module = spec.build(flax_d2v.tiny_config(**extra, tdnn_dim=(8, 8), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1)))
        for path in keys.flatten(param_shapes(module)):
            hf_key, kind = keys.flax_to_hf_key(path)
            assert keys.hf_to_flax_key(hf_key) == (path, kind), path


def test_optimizer_groups_follow_the_head_tree():
    """The head is what sits beside `data2vec_audio`: the x-vector's own `feature_extractor` Linear is
    trained while the conv feature encoder is frozen; freeze_base_model freezes the whole encoder."""
    from flax import traverse_util

    import flax_d2v
    from flax_d2v.heads import Data2VecAudioForXVector
    from flax_d2v.modeling import init_params
    from flax_d2v.train.state import param_labels

    config = flax_d2v.tiny_config(tdnn_dim=(8, 8), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1), xvector_output_dim=8)
    params = init_params(Data2VecAudioForXVector(config), 0)
    labels = traverse_util.flatten_dict(param_labels(params, True, 5))
    assert labels[("feature_extractor", "kernel")] == "trainable"
    assert labels[("objective", "weight")] == "trainable"
    assert labels[("data2vec_audio", "feature_extractor", "conv_layers_0", "conv", "kernel")] == "frozen"
    assert labels[("data2vec_audio", "encoder", "layer_norm", "scale")] == "delayed"
    labels = traverse_util.flatten_dict(param_labels(params, False, 0, freeze_base_model=True))
    assert {v for k, v in labels.items() if k[0] == "data2vec_audio"} == {"frozen"}
    assert {v for k, v in labels.items() if k[0] != "data2vec_audio"} == {"trainable"}
    # a bare encoder has no head: its feature_extractor is the conv encoder
    bare = init_params(flax_d2v.Data2VecAudioModel(config), 0)
    labels = traverse_util.flatten_dict(param_labels(bare, True, 0))
    assert labels[("feature_extractor", "conv_layers_0", "conv", "kernel")] == "frozen"


def test_ctc_with_adapter_uses_the_adapter_frame_count():
    import jax.numpy as jnp

    import flax_d2v
    from flax_d2v.modeling import feat_extract_output_lengths, init_params
    from flax_d2v.train.ctc import CTCObjective

    config = flax_d2v.tiny_config(add_adapter=True, num_adapter_layers=2, output_hidden_size=48)
    module = flax_d2v.Data2VecAudioForCTC(config)
    params = init_params(module, 0)
    mask = np.zeros((2, 32000), np.int32)
    mask[0], mask[1, :20000] = 1, 1
    batch = {"input_values": jnp.ones((2, 32000)), "attention_mask": jnp.asarray(mask)}
    ids, lengths = CTCObjective(module).predict(params, batch)
    want = [int(feat_extract_output_lengths(config, n, add_adapter=True)) for n in (32000, 20000)]
    assert lengths.tolist() == want and ids.shape[1] == want[0]
    with transformers_model_lengths(config) as hf_lengths:
        assert hf_lengths([32000, 20000]) == want


class transformers_model_lengths:
    """transformers' own `_get_feat_extract_output_lengths` for `config` (the reference for the count)."""

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        import json

        cfg = transformers.Data2VecAudioConfig(
            **{k: v for k, v in json.loads(self.config.to_json_string()).items() if k != "model_type"}
        )
        model = transformers.Data2VecAudioForCTC(cfg)
        return lambda ns: model._get_feat_extract_output_lengths(torch.tensor(ns)).tolist()

    def __exit__(self, *exc):
        return False


def test_head_spec_is_not_a_boolean():
    from flax_d2v.heads import REGISTRY

    with pytest.raises(TypeError, match="is_ctc"):
        bool(REGISTRY["Data2VecAudioForCTC"])
