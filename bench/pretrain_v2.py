"""Pretraining throughput: data2vec 2.0 against data2vec 1.0, same encoder size, same batch, one process.

    python bench/pretrain_v2.py                                  # base size, batch 2 x 4 s, 3 timed updates
    python bench/pretrain_v2.py --size tiny --batch 4 --seconds 4 --repeats 5 --json results/cpu-pretrain-v2.json

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
from flax_d2v.modeling import Data2VecAudioModel, init_params  # noqa: E402
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


def setup(arch: str, size: str, clone_batch: int, top_k: int):
    if arch == "data2vec":
        config = base_config(layerdrop=0.0) if size == "base" else tiny_config(layerdrop=0.0)
        module = Data2VecAudioModel(config)
        obj = Data2VecObjective(module, Data2VecPretrainConfig(average_top_k_layers=top_k))
        params = obj.init_params(init_params(module), jax.random.PRNGKey(1))
    else:
        config = (
            Data2Vec2Config(layerdrop=0.0, prenet_layerdrop=0.0)
            if size == "base"
            else tiny_config_v2(layerdrop=0.0, prenet_layerdrop=0.0)
        )
        module = Data2Vec2Model(config)
        obj = Data2Vec2Objective(module, Data2Vec2PretrainConfig(clone_batch=clone_batch, average_top_k_layers=top_k))
        params = obj.init_params(init_params(module), jax.random.PRNGKey(1))
    return obj, params


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["base", "tiny"], default="base")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--clone-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    values, _ = C.speech_batch(C.load_clips(), args.batch, args.seconds)
    batch = {"input_values": jnp.asarray(values), "index": jnp.arange(args.batch)}
    top_k = 8 if args.size == "base" else 2
    tx = optax.adamw(7.5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01)
    fns, compile_s, state = {}, {}, {}
    for arch in ("data2vec", "data2vec2"):
        obj, params = setup(arch, args.size, args.clone_batch, top_k)
        step = make_step(obj, tx)
        st = [params, tx.init(params), obj.init_extra(params)]
        _, compile_s[arch] = C.timed(
            lambda s=st, f=step: jax.block_until_ready(
                f(*jax.tree.map(jnp.copy, tuple(s)), batch, jax.random.PRNGKey(0), jnp.asarray(0))
            )
        )
        state[arch] = st

        def run(s=st, f=step):
            s[0], s[1], s[2], loss = f(s[0], s[1], s[2], batch, jax.random.PRNGKey(0), jnp.asarray(0))
            jax.block_until_ready(loss)

        fns[arch] = run
    times = C.interleaved_times(fns, args.repeats, warmup=1)
    audio = args.batch * args.seconds
    result = {
        "machine": C.machine_info(),
        "versions": C.library_versions(),
        "load_average": C.load_average(),
        "size": args.size,
        "batch": args.batch,
        "seconds": args.seconds,
        "clone_batch": args.clone_batch,
        "cases": {},
    }
    rows = []
    for arch, ts in times.items():
        s = C.summarize(ts)
        result["cases"][arch] = {
            **s,
            "first_call_s": compile_s[arch],
            "updates_per_s": 1.0 / s["median_s"],
            "audio_s_per_s": audio / s["median_s"],
        }
        rows.append(
            [
                arch,
                f"{s['median_s']:.2f} s",
                f"{1.0 / s['median_s']:.3f}",
                f"{audio / s['median_s']:.2f}",
                f"{compile_s[arch]:.0f} s",
            ]
        )
    r = times["data2vec"], times["data2vec2"]
    ratio = C.summarize(r[0])["median_s"] / C.summarize(r[1])["median_s"]
    result["v1_over_v2_time"] = ratio
    print(C.markdown_table(["objective", "time / update", "updates/s", "audio s/s", "first call"], rows))
    print(
        f"\n1.0 time / 2.0 time per update: {ratio:.2f}  (batch {args.batch} x {args.seconds:g} s, {args.size}, "
        f"clone_batch {args.clone_batch})"
    )
    if args.json:
        C.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
