"""Pretraining throughput: data2vec 2.0 against data2vec 1.0, same encoder size, same batch, one process.

    python bench/pretrain_v2.py                                  # base size, batch 2 x 4 s, 3 timed updates
    python bench/pretrain_v2.py --size tiny --batch 4 --seconds 4 --repeats 5 --json results/cpu-pretrain-v2.json
    python bench/pretrain_v2.py --size base --dtype bfloat16 --batch 64 --seconds 10 --archs data2vec   # a GPU

One update of each objective as the training loop runs it (`flax_d2v.train.objective` contract): loss
and gradient of `loss_sum / weight`, AdamW (fairseq's betas, eps 1e-6, weight decay 0.01), then the
EMA teacher update, as one jitted function with params, optimizer state and teacher donated.

- 1.0: `train.data2vec_objective.Data2VecObjective` with `base_librispeech.yaml` defaults (mask_prob 0.65,
  mask_length 10; the student runs all frames, masked ones replaced by `mask_emb`; `final_proj`).
- 2.0: `train.data2vec2_objective.Data2Vec2Objective` with `base_audio_only_task.yaml` defaults (clone_batch 8,
  block masks of 5 with mask_prob 0.5; the student runs the kept half of each of the 8 copies; Decoder1d).

Encoder size: 1.0's base (`flax_d2v.base_config`, 12 post-LN layers, 768 wide) against 2.0's base
(12 AltBlocks, 768 wide, no prenet, decoder 384 x 4): the same transformer cost per frame (2.0's
fused qkv and ALiBi add nothing of note). Reported: seconds per update, updates per second, and
seconds of audio per second counted on the clips of the batch (B x seconds / time): what a pretraining
run consumes. fairseq's data2vec 2.0 base is run with 8 clones, so each of its updates sees each clip
8 times under different masks; the paper's speed-up claim (wall-clock to a given accuracy) is not
something one update can measure.

MFU: the analytic FLOPs of one update (`common.data2vec_pretrain_flops` / `data2vec2_pretrain_flops`, counted
as the CTC step's: forward, twice the forward for the backward of trained parts, the teacher's forward) over
the median time, against the machine's measured matmul peak (`common.matmul_peak`), as `bench/train.py`.
PyTorch side: none. transformers has no data2vec pretraining objective (its Data2VecAudio classes are the
encoder and fine-tuning heads), and the 2.0 objective exists only in fairseq, which is not installed; the
script says so in its output and JSON rather than timing a PyTorch objective of its own making.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

from flax_d2v import base_config, tiny_config  # noqa: E402
from flax_d2v.data2vec2 import Data2Vec2Config, Data2Vec2Model, tiny_config_v2  # noqa: E402
from flax_d2v.modeling import Data2VecAudioModel, feat_extract_output_lengths, init_params  # noqa: E402
from flax_d2v.precision import resolve  # noqa: E402
from flax_d2v.train.data2vec2_objective import Data2Vec2Objective, Data2Vec2PretrainConfig  # noqa: E402
from flax_d2v.train.data2vec_objective import Data2VecObjective, Data2VecPretrainConfig  # noqa: E402


def make_step(objective: Any, tx: optax.GradientTransformation):
    def step(params, opt_state, extra, batch, rng, count):
        def f(p):
            loss, weight, metrics = objective.loss(p, extra, batch, rng, count)
            return loss / weight, metrics

        (loss, _), grads = jax.value_and_grad(f, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        extra = objective.update_extra(extra, params, count)
        return params, opt_state, extra, loss

    return jax.jit(step, donate_argnums=(0, 1, 2))


def setup(arch: str, size: str, clone_batch: int, top_k: int, precision: str = "default"):
    kw = resolve(precision).module_kwargs()
    if arch == "data2vec":
        config = base_config(layerdrop=0.0) if size == "base" else tiny_config(layerdrop=0.0)
        module = Data2VecAudioModel(config, **kw)
        obj = Data2VecObjective(module, Data2VecPretrainConfig(average_top_k_layers=top_k))
        params = obj.init_params(init_params(Data2VecAudioModel(config)), jax.random.PRNGKey(1))
    else:
        config = (
            Data2Vec2Config(layerdrop=0.0, prenet_layerdrop=0.0)
            if size == "base"
            else tiny_config_v2(layerdrop=0.0, prenet_layerdrop=0.0)
        )
        module = Data2Vec2Model(config, **kw)
        obj = Data2Vec2Objective(module, Data2Vec2PretrainConfig(clone_batch=clone_batch, average_top_k_layers=top_k))
        params = obj.init_params(init_params(Data2Vec2Model(config)), jax.random.PRNGKey(1))
    return obj, params


def analytic_flops(arch: str, obj: Any, batch: int, num_samples: int) -> dict[str, float]:
    config = obj.module.config
    if arch == "data2vec":
        return C.data2vec_pretrain_flops(config, batch, num_samples)
    frames = int(feat_extract_output_lengths(config, num_samples))
    kept = frames - obj.config.masked_count(frames)
    return C.data2vec2_pretrain_flops(config, batch, num_samples, obj.config.clone_batch, kept)


NO_PYTORCH = {
    "data2vec": "none: transformers has no data2vec 1.0 pretraining objective (EMA teacher, masked regression), "
    "only the encoder and fine-tuning heads; fairseq's is the reference and is not installed",
    "data2vec2": "none: the data2vec 2.0 objective (clones, decoder) exists only in fairseq, which is not installed",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["base", "tiny"], default="base")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--clone-batch", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16: the bf16 policy")
    p.add_argument("--archs", default="data2vec,data2vec2", help="which objectives (comma-separated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peak-sizes", default="1024,2048", help="square matmul sizes for the machine's peak")
    p.add_argument("--compilation-cache", default=None, help="JAX's persistent compilation cache in DIR (as `d2v`)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.compilation_cache:
        from flax_d2v import compile_cache

        compile_cache.enable(args.compilation_cache)
    archs = [a for a in args.archs.split(",") if a]
    if not archs or set(archs) - {"data2vec", "data2vec2"}:
        p.error(f"--archs: choose from data2vec, data2vec2, got {args.archs!r}")
    peak_sizes = [int(v) for v in args.peak_sizes.split(",")]
    precision = "bf16" if args.dtype == "bfloat16" else "default"

    start_peak = C.matmul_peak(peak_sizes, dtype=args.dtype)
    values, _ = C.speech_batch(C.load_clips(), args.batch, args.seconds)
    batch = {"input_values": jnp.asarray(values), "index": jnp.arange(args.batch)}
    top_k = 8 if args.size == "base" else 2
    tx = optax.adamw(7.5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01)
    fns, compile_s, xla_flops, flops = {}, {}, {}, {}
    for arch in archs:
        obj, params = setup(arch, args.size, args.clone_batch, top_k, precision)
        flops[arch] = analytic_flops(arch, obj, args.batch, values.shape[1])
        st = [params, tx.init(params), obj.init_extra(params)]
        key, count = jax.random.PRNGKey(0), jnp.asarray(0)
        compiled, compile_s[arch] = C.timed(
            lambda s=st, k=key, n=count, o=obj: make_step(o, tx).lower(*s, batch, k, n).compile()
        )
        xla_flops[arch] = C.xla_flops(compiled)

        def run(s=st, f=compiled, k=key, n=count):
            s[0], s[1], s[2], loss = f(s[0], s[1], s[2], batch, k, n)
            jax.block_until_ready(loss)

        fns[arch] = run
    times = C.interleaved_times(fns, args.repeats, warmup=args.warmup)
    peak = C.best_peak(start_peak, C.matmul_peak(peak_sizes, dtype=args.dtype))
    audio = args.batch * values.shape[1] / C.SAMPLE_RATE
    result = {
        "benchmark": "pretrain_update",
        "machine": C.machine_info(),
        "versions": C.library_versions(),
        "load_average": C.load_average(),
        "size": args.size,
        "dtype": args.dtype,
        "precision": precision,
        "batch": args.batch,
        "seconds": args.seconds,
        "clone_batch": args.clone_batch,
        "matmul_peak": peak,
        "pytorch": {arch: NO_PYTORCH[arch] for arch in archs},
        "cases": {},
    }
    rows = []
    for arch, ts in times.items():
        s = C.summarize(ts)
        rate = flops[arch]["total"] / s["median_s"] / 1e9
        result["cases"][arch] = {
            **s,
            "compile_s": compile_s[arch],
            "updates_per_s": 1.0 / s["median_s"],
            "audio_s_per_s": audio / s["median_s"],
            "analytic_flops": flops[arch],
            "xla_flops": xla_flops[arch],
            "gflops_per_s": rate,
            "fraction_of_matmul_peak": rate / peak["gflops"],
        }
        rows.append(
            [
                arch,
                f"{1000 * s['median_s']:.1f} ms",
                f"{audio / s['median_s']:.2f}",
                f"{flops[arch]['total'] / 1e9:.1f}",
                f"{rate:.0f} ({100 * rate / peak['gflops']:.0f}% of {peak['gflops']:.0f})",
                f"{compile_s[arch]:.1f} s",
            ]
        )
    header = ["objective", "time / update", "audio s/s", "GFLOP / update", "GFLOP/s (MFU of peak)", "compile"]
    print(C.markdown_table(header, rows))
    for arch in archs:
        print(f"PyTorch {arch}: {NO_PYTORCH[arch]}")
    if len(times) == 2:
        v1, v2 = (C.summarize(times[a])["median_s"] for a in ("data2vec", "data2vec2"))
        result["v1_over_v2_time"] = v1 / v2
        result["v2_over_v1_time"] = v2 / v1
        print(
            f"\n2.0 time / 1.0 time per update, same audio: {v2 / v1:.2f}  (batch {args.batch} x {args.seconds:g} s, "
            f"{args.size}, {args.dtype}, clone_batch {args.clone_batch})"
        )
    if args.json:
        C.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
