"""The precision policy reaches every matmul and convolution, whatever the global JAX flag says.

On CPU, XLA ignores precision configs, so a GPU/TPU precision bug (TF32 or bf16 passes where the
user asked for float32) cannot show up in numbers here. It shows up in the program: these tests
lower the jitted programs and read the precision config of every `dot_general` and
`convolution` from the StableHLO text.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_d2v
from flax_d2v.errors import D2VError
from flax_d2v.precision import NAMES, POLICIES, resolve

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import perturb_layer_norms, tiny_hf_kwargs  # noqa: E402

OPS = re.compile(r"stablehlo\.(dot_general|convolution)\b[^\n]*")
PRECISION = re.compile(r"precision\s*=\s*\[([^\]]*)\]|precision_config\s*=\s*\[([^\]]*)\]")


def op_precisions(hlo_text: str) -> list[tuple[str, str]]:
    """(op, its precision config or 'none') for every dot_general and convolution in the module."""
    found = []
    for m in OPS.finditer(hlo_text):
        p = PRECISION.search(m.group(0))
        found.append((m.group(1), "none" if p is None else (p.group(1) or p.group(2))))
    return found


def assert_all(hlo_text: str, level: str) -> int:
    ops = op_precisions(hlo_text)
    assert ops, "no dot_general or convolution in the lowered program"
    kinds = {op for op, _ in ops}
    assert kinds == {"dot_general", "convolution"}, kinds
    bad = [(op, p) for op, p in ops if p.count(level) != 2]
    assert not bad, f"{len(bad)}/{len(ops)} ops not at {level}: {bad[:5]}"
    return len(ops)


@pytest.fixture(scope="module")
def tiny_ctc_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.Data2VecAudioForCTC(transformers.Data2VecAudioConfig(**tiny_hf_kwargs())).eval()
    perturb_layer_norms(model)
    path = tmp_path_factory.mktemp("prec") / "ctc"
    model.save_pretrained(path)
    return str(path)


def test_verify_forward_is_highest_even_under_a_lower_global_flag(tiny_ctc_dir):
    """The program `d2v verify` runs: every matmul/conv HIGHEST, also when the user's global flag
    asks for bf16 passes (what a TPU does by default). Fails on a model that leaves precision
    to the global flag (seen before the policy: all 27 ops of the tiny CTC forward at DEFAULT)."""
    from flax_d2v.api.verify import flax_forward

    module, params = flax_d2v.from_pretrained(tiny_ctc_dir, precision="highest")
    x = jnp.zeros((2, 8000), jnp.float32)
    m = jnp.ones((2, 8000), jnp.int32)
    with jax.default_matmul_precision("bfloat16"):
        text = flax_forward(module).lower(params, x, m).as_text()
    assert assert_all(text, "HIGHEST") >= 7 + 2 * 6  # 7 conv layers, 6 projections per layer, ...


def test_default_policy_is_explicit_too(tiny_ctc_dir):
    """`default` is stamped DEFAULT explicitly: a user's JAX_DEFAULT_MATMUL_PRECISION=highest does
    not silently slow training down, and the program is the same on every machine."""
    module, params = flax_d2v.from_pretrained(tiny_ctc_dir, precision="default")
    fn = jax.jit(lambda p, x: module.apply({"params": p}, x).logits)
    with jax.default_matmul_precision("highest"):
        text = fn.lower(params, jnp.zeros((1, 8000))).as_text()
    assert_all(text, "DEFAULT")


def test_gradients_keep_the_policy(tiny_ctc_dir):
    """The backward pass (transposed dot_generals and convs) carries the forward's precision."""
    module, params = flax_d2v.from_pretrained(tiny_ctc_dir, precision="highest")

    def loss(p, x):
        return module.apply({"params": p}, x).logits.astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss)).lower(params, jnp.zeros((1, 8000))).as_text()
    n = assert_all(text, "HIGHEST")
    assert n > 2 * (7 + 12)  # forward and backward ops


def test_bf16_policy_computes_in_bf16(tiny_ctc_dir):
    module, params = flax_d2v.from_pretrained(tiny_ctc_dir, precision="bf16")
    assert module.dtype == jnp.bfloat16 and module.precision == "default"
    text = jax.jit(lambda p, x: module.apply({"params": p}, x).logits).lower(params, jnp.zeros((1, 8000))).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dots and all("bf16" in line for line in dots)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))


def test_training_modules_follow_the_precision_setting():
    from flax_d2v.train.run_common import module_options

    base = {"remat": "none", "scan_layers": False, "freeze_feature_encoder": False}
    assert module_options({**base, "bf16": False})["precision"] == "default"
    assert module_options({**base, "bf16": True})["dtype"] == jnp.bfloat16
    opts = module_options({**base, "bf16": False, "precision": "highest"})
    assert (opts["dtype"], opts["precision"]) == (jnp.float32, "highest")


def test_policy_errors_are_one_line():
    assert set(NAMES) == {"highest", "default", "bf16"} and resolve("bf16") is POLICIES["bf16"]
    with pytest.raises(D2VError, match="precision 'tf32': choose one of highest, default, bf16"):
        resolve("tf32")
    from flax_d2v.api.pretrained import precision_kwargs

    with pytest.raises(D2VError, match="contradicts precision='highest'"):
        precision_kwargs("highest", jnp.bfloat16)
    assert precision_kwargs(None, jnp.bfloat16)["dtype"] == jnp.bfloat16  # the older dtype= spelling


def test_verify_bf16_on_real_speech_passes_its_tolerance(tiny_ctc_dir, speech_dir):
    """`verify --precision bf16` on real speech: within the bf16 tolerance, and honestly above the
    fp32 one (a check that the Flax side really ran in bf16)."""
    from flax_d2v.api.verify import PARITY_RTOL, TOLERANCES, verify

    clips = [str(speech_dir / "16k/librivox_0880.wav"), str(speech_dir / "16k/cards_001.wav")]
    rows, facts = verify(tiny_ctc_dir, clips, precision="bf16")
    assert facts["precision"] == "bf16" and facts["tolerance"] == TOLERANCES["bf16"]
    assert "precision=bf16" in facts["flax"] and "TF32 off" in facts["reference"]
    assert all(r.passed for r in rows), [(r.case, r.stage, r.rel) for r in rows if not r.passed]
    assert max(r.rel for r in rows) > PARITY_RTOL


def test_verify_cli_precision_flag_and_report(tiny_ctc_dir, speech_dir, tmp_path, capsys):
    from flax_d2v.cli import main

    report = tmp_path / "r" / "report.md"
    rc = main(
        [
            "verify",
            tiny_ctc_dir,
            "--audio",
            str(speech_dir / "16k/cards_001.wav"),
            "--precision",
            "default",
            "--no-batch",
            "--report",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "PASS" in out and "precision=default" in out
    text = report.read_text()
    assert "TOLERANCES['default']" in text and "TF32 off" in text and report.with_suffix(".png").is_file()


def test_highest_and_default_agree_on_cpu(tiny_ctc_dir):
    """On CPU both policies compute fp32 (precision configs are ignored there): same numbers."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8000)), jnp.float32)
    outs = []
    for name in ("highest", "default"):
        module, params = flax_d2v.from_pretrained(tiny_ctc_dir, precision=name)
        outs.append(np.asarray(module.apply({"params": params}, x).logits))
    if jax.default_backend() == "cpu":
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)


def test_fused_attention_padding_and_masking_match_the_explicit_path():
    """The fused path's own work (padding T to a multiple of 64, key lengths from the padding bias,
    slicing back) gives the explicit path's numbers; run through XLA so it is checked on any
    machine (cuDNN computes the same attention on a GPU)."""
    from flax_d2v.modeling import fused_attention

    rng = np.random.default_rng(0)
    b, t, h, d = 3, 75, 4, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32) for _ in range(3))
    lengths = jnp.array([75, 50, 13])
    bias = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias
    want = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    got = fused_attention(q, k, v, bias, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    no_mask = fused_attention(q, k, v, None, implementation="xla")
    full = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1), v)
    np.testing.assert_allclose(np.asarray(no_mask), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert fused_attention(q, k, v, bias) is None or jax.default_backend() == "gpu"  # fp32: explicit path


def test_data2vec2_forward_is_highest_and_verify_bf16_honest(tmp_path, speech_dir):
    """data2vec 2.0 follows the same policy: its verify forward carries HIGHEST everywhere under a
    bf16 global flag, and `verify --precision bf16` against the PyTorch rendering passes its own
    tolerance while being measurably above the fp32 one."""
    import fairseq2_fixtures as F2
    from fairseq_fixtures import save_checkpoint

    from flax_d2v.api.verify import PARITY_RTOL, TOLERANCES, flax_forward, verify

    pt = save_checkpoint(F2.ctc_checkpoint("base")[0], tmp_path / "ctc2.pt")
    module, params = flax_d2v.from_pretrained(pt, precision="highest")
    with jax.default_matmul_precision("bfloat16"):
        text = flax_forward(module).lower(params, jnp.zeros((2, 8000)), jnp.ones((2, 8000), jnp.int32)).as_text()
    assert_all(text, "HIGHEST")
    rows, facts = verify(str(pt), [str(speech_dir / "16k/cards_001.wav")], precision="bf16")
    assert facts["tolerance"] == TOLERANCES["bf16"] and "precision=bf16" in facts["flax"]
    assert all(r.passed for r in rows), [(r.stage, r.rel) for r in rows if not r.passed]
    assert max(r.rel for r in rows) > PARITY_RTOL


def test_public_model_steps_keep_the_policy():
    """Every public step of the models (what pretraining and benchmarks call alone with
    `apply(..., method=...)`, outside `__call__`) traces at the module's precision under a lower
    global flag, as `__call__` does."""
    from flax_d2v.data2vec2 import Data2Vec2Model, tiny_config_v2
    from flax_d2v.train.data2vec_objective import _student_forward

    def all_at(text: str, level: str) -> None:
        ops = op_precisions(text)
        assert ops, "no dot_general or convolution in the lowered program"
        bad = [(op, p) for op, p in ops if p.count(level) != 2]
        assert not bad, f"{len(bad)}/{len(ops)} ops not at {level}: {bad[:5]}"

    x, am = jnp.zeros((2, 8000)), jnp.ones((2, 8000), jnp.int32)
    module = flax_d2v.Data2VecAudioModel(flax_d2v.tiny_config(mask_time_prob=0.05), precision="highest")
    params = flax_d2v.init_params(module, 0, 8000)
    frames = int(flax_d2v.feat_extract_output_lengths(module.config, 8000))
    feats, h = jnp.zeros((2, frames, 32)), jnp.zeros((2, frames, 64))
    mask = jnp.zeros((2, frames), bool)
    calls = {
        "conv_features": (x,),
        "project_features": (feats,),
        "encode_features": (x, am),
        "encode": (h, mask),
        lambda m, *a: _student_forward(m, *a, True): (x, am, mask),
    }
    v2 = Data2Vec2Model(tiny_config_v2(), precision="highest")
    params2 = flax_d2v.init_params(v2, 0, 8000)
    keep = jnp.tile(jnp.arange(frames // 2)[None], (2, 1))
    calls2 = {"local_features": (x,), "contextualize": (h,), "encode_masked": (h, mask, keep)}
    with jax.default_matmul_precision("bfloat16"):
        for mod, p, table in ((module, params, calls), (v2, params2, calls2)):
            for method, args in table.items():
                fn = jax.jit(lambda p, *a, m=method, mod=mod: mod.apply({"params": p}, *a, method=m))
                all_at(fn.lower(p, *args).as_text(), "HIGHEST")
