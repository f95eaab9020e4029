"""Training speed: one CTC fine-tuning step, Flax against PyTorch, same weights and data, one process.

    python bench/train.py                               # base size, batch 4 x 5 s, 5 timed steps
    python bench/train.py --batch 4 --seconds 5 --repeats 10 --json results/train.json

The step, as in data2vec/wav2vec2 fine-tuning: forward in training mode (dropout, SpecAugment
time masks at the config's `mask_time_prob`), CTC loss (`ctc_loss_reduction="sum"`, the pad id as
blank), backward with the conv feature encoder frozen, AdamW update. Flax: one jitted pure
function `(params, opt_state, batch, rng) -> (params, opt_state, loss)` with buffers donated,
`freeze_feature_encoder=True` (stop-gradient) and `optax.set_to_zero` on the encoder's params.
PyTorch: `Data2VecAudioForCTC.freeze_feature_encoder()`, `loss.backward()`, `torch.optim.AdamW`
(the fused CPU kernel when available). LayerDrop is set to 0 on both sides: PyTorch skips the
dropped layers' work while a jitted step computes them, which would make the step's cost random.
Before timing, both compute the deterministic (eval-mode) loss at the same weights: the two
numbers must agree, or the sides are not doing the same work.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import flax_d2v  # noqa: E402
from flax_d2v.precision import matmul_precision  # noqa: E402
from flax_d2v.train import ctc as CTC  # noqa: E402
from flax_d2v.train import vocab as V  # noqa: E402

PyTree = Any
# Regularisation of the timed step. "fairseq": data2vec/wav2vec 2.0 fine-tuning (Wav2Vec2AsrConfig's
# defaults, which its base_100h/960h recipes keep: dropout 0, attention dropout 0, activation
# dropout 0.1); "hf": what a transformers checkpoint's config.json holds (0.1 everywhere).
# LayerDrop is 0 in both, so the step's cost is not random.
RECIPES = {
    "fairseq": {"hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.1, "final_dropout": 0.0},
    "hf": {"hidden_dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1, "final_dropout": 0.1},
}
LEARNING_RATE = 1e-4  # any value: the step costs the same
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, set explicitly on both sides


def encode_labels(texts: list[str], vocab: dict[str, int], max_len: int) -> np.ndarray:
    """(B, L) int32 character ids, right-padded with -100 (transformers' label padding)."""
    ids = [V.encode(t, vocab)[0][:max_len] for t in texts]
    out = np.full((len(ids), max(len(i) for i in ids)), -100, np.int32)
    for row, i in zip(out, ids, strict=True):
        row[: len(i)] = i
    return out


def frozen_labels(params: PyTree) -> PyTree:
    """ "frozen" for the conv feature encoder's params, "train" for the rest."""
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({k: "frozen" if "feature_extractor" in k else "train" for k in flat})


def make_optimizer(params: PyTree) -> optax.GradientTransformation:
    adamw = optax.adamw(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, frozen_labels(params))


# Ablation switches (`--ablate a,b,...`): each removes one part of the step, so the time it saves is
# that part's cost. Measured one by one against the full step in the same process.
ABLATIONS = {
    "ctc_sum": "CTC loss replaced by the sum of the logits",
    "no_dropout": "dropout, attention dropout and SpecAugment off (deterministic forward)",
    "no_optimizer": "gradients computed, AdamW update skipped",
    "xla_attention": "explicit XLA attention instead of cuDNN's fused kernel",
    "no_feature_encoder": "conv feature encoder skipped (its output precomputed outside the step)",
    "no_attention": "attention replaced by its value projection (no scores, no softmax)",
}


def ctc_loss(
    module: Any,
    params: PyTree,
    x: jax.Array,
    labels: jax.Array,
    rng: jax.Array | None,
    ablate: frozenset[str] = frozenset(),
) -> jax.Array:
    """Summed CTC loss over the batch (transformers' `ctc_loss_reduction="sum"`); rng None = eval mode."""
    kwargs = (
        {"deterministic": True}
        if rng is None or "no_dropout" in ablate
        else {"deterministic": False, "rngs": {"dropout": rng}}
    )
    if "no_feature_encoder" in ablate:  # x holds the conv features: run the model from the projection on
        logits = _from_features(module, params, x, kwargs["deterministic"], kwargs.get("rngs"))
    else:
        logits = module.apply({"params": params}, x, **kwargs).logits
    if "ctc_sum" in ablate:
        return logits.astype(jnp.float32).sum() * 1e-6
    logit_paddings = jnp.zeros(logits.shape[:2], jnp.float32)
    label_paddings = (labels < 0).astype(jnp.float32)
    blank = module.config.pad_token_id or 0
    # the loss `d2v finetune` computes (optax's recursion, unrolled)
    per_example = CTC.ctc_loss(logits, logit_paddings, jnp.maximum(labels, 0), label_paddings, blank_id=blank)
    return per_example.sum()


def _from_features(module: Any, params: PyTree, features: jax.Array, deterministic: bool, rngs: Any) -> jax.Array:
    """`Data2VecAudioForCTC` logits from the conv features on (the `no_feature_encoder` ablation)."""
    enc = flax_d2v.modeling.Data2VecAudioModel(
        module.config, module.dtype, module.remat_policy, module.scan_layers, True, module.precision
    )

    def body(m, feats):
        h = m.project_features(feats, deterministic=deterministic).hidden_states
        return m.encode(h, deterministic=deterministic).last_hidden_state

    h = enc.apply({"params": params["data2vec_audio"]}, features, method=body, rngs=rngs)
    with matmul_precision(module.precision):
        head = params["lm_head"]
        return (h @ head["kernel"].astype(h.dtype) + head["bias"].astype(h.dtype)).astype(jnp.float32)


def make_train_step(module: Any, tx: optax.GradientTransformation, ablate: frozenset[str] = frozenset()) -> Callable:
    """The jitted pure step `(params, opt_state, x, labels, rng) -> (params, opt_state, loss)`."""

    def step(params, opt_state, x, labels, rng):
        loss, grads = jax.value_and_grad(lambda p: ctc_loss(module, p, x, labels, rng, ablate))(params)
        if "no_optimizer" in ablate:  # keep the gradients alive: one scalar that reads all of them
            norm = sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads))
            return params, opt_state, loss + 0.0 * norm
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def torch_side(
    path: str, x: np.ndarray, labels: np.ndarray, config_overrides: dict[str, Any], dtype: str
) -> dict[str, Any]:
    """PyTorch's step: fp32 weights and optimizer; `bfloat16` computes under autocast (mixed precision)."""
    import torch

    device = C.torch_device()
    model = C.torch_model(path, ctc=True, **config_overrides).to(device)
    model.freeze_feature_encoder()
    xt, lt = torch.from_numpy(x).to(device), torch.from_numpy(labels.astype(np.int64)).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with torch.no_grad(), autocast:
        eval_loss = float(model.eval()(xt, labels=lt).loss)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=True)
        kind = "fused"
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, foreach=True)
        kind = "foreach"

    def call():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(xt, labels=lt).loss
        loss.backward()
        opt.step()
        return loss.item()  # blocks until the step is done (CUDA included)

    return {"call": call, "eval_loss": eval_loss, "adamw": kind, "device": device}


def flax_module(path: str, dtype: str, scan_layers: bool) -> tuple[Any, PyTree]:
    """Module and params as fine-tuning builds them: fp32 params, compute per the precision policy."""
    precision = "bf16" if dtype == "bfloat16" else "default"  # what `d2v finetune` runs by default on a GPU
    return flax_d2v.from_pretrained(path, freeze_feature_encoder=True, precision=precision, scan_layers=scan_layers)


def flax_side(
    module: Any, params: PyTree, x: np.ndarray, labels: np.ndarray, seed: int = 0, ablate: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Flax's step (fp32 params and optimizer state), compiled for these shapes; `ablate` removes parts."""
    xj, lj = jnp.asarray(x), jnp.asarray(labels)
    if "no_feature_encoder" in ablate:
        enc = flax_d2v.modeling.Data2VecAudioModel(module.config, module.dtype, precision=module.precision)
        xj = jax.jit(lambda p, v: enc.apply({"params": p}, v, method="conv_features"))(params["data2vec_audio"], xj)
    eval_loss = float(jax.jit(lambda p: ctc_loss(module, p, xj, lj, None, ablate))(params))
    tx = make_optimizer(params)
    state = {"params": jax.device_put(params), "opt_state": jax.jit(tx.init)(params)}
    step = make_train_step(module, tx, ablate)
    rng = jax.random.PRNGKey(seed)
    saved = flax_d2v.modeling.fused_attention
    if "xla_attention" in ablate:
        flax_d2v.modeling.fused_attention = lambda *a: None
    if "no_attention" in ablate:
        flax_d2v.modeling.fused_attention = lambda q, k, v, bias: v
    try:
        lowered, lower_s = C.timed(lambda: step.lower(state["params"], state["opt_state"], xj, lj, rng))
    finally:
        flax_d2v.modeling.fused_attention = saved
    compiled, compile_s = C.timed(lowered.compile)

    def call():
        nonlocal rng
        rng, key = jax.random.split(rng)
        state["params"], state["opt_state"], loss = compiled(state["params"], state["opt_state"], xj, lj, key)
        return float(loss)  # blocks until the step is done

    return {
        "call": call,
        "eval_loss": eval_loss,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "xla_flops": C.xla_flops(compiled),
        "xla_memory": C.xla_memory(compiled),
        "module": module,
    }


def run_ablations(
    module: Any,
    params: PyTree,
    x: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    repeats: int,
    warmup: int,
    full_s: float,
    flops: float,
    peak_gflops: float,
) -> list[dict[str, Any]]:
    """Each ablation's step time against the full step: the difference is that part's cost."""
    rows = []
    for name in names:
        side = flax_side(module, params, x, labels, ablate=frozenset([name]))
        s = C.summarize(C.interleaved_times({"flax": side["call"]}, repeats, warmup)["flax"])
        rows.append(
            {
                "ablation": name,
                "what": ABLATIONS[name],
                "median_s": s["median_s"],
                "saves_s": full_s - s["median_s"],
                "saves_fraction": (full_s - s["median_s"]) / full_s,
                "compile_s": side["compile_s"],
            }
        )
        print(f"ablation {name}: {1000 * s['median_s']:.1f} ms (full {1000 * full_s:.1f} ms)", file=sys.stderr)
        del side
    return rows


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """One timed comparison; returns the JSON-ready result."""
    threads = None if args.no_torch else C.set_torch_threads(args.torch_threads)
    result: dict[str, Any] = {
        "benchmark": "train_ctc_step",
        "machine": C.machine_info(threads),
        "size": args.size,
        "model": args.model,
        "batch": args.batch,
        "seconds": args.seconds,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    start_peak = C.matmul_peak(args.peak_sizes, dtype=args.dtype)
    print(f"matmul peak: {start_peak['gflops']:.0f} GFLOP/s", file=sys.stderr)
    clips = C.load_clips()
    x, texts = C.speech_batch(clips, args.batch, args.seconds)
    vocab = V.build_vocab(texts)
    overrides = {
        "layerdrop": 0.0,
        "ctc_loss_reduction": "sum",
        "vocab_size": max(32, len(vocab)),
        "pad_token_id": V.PAD_ID,
        **RECIPES[args.recipe],
    }
    result["recipe"] = args.recipe
    result["prng"] = args.prng or str(jax.config.jax_default_prng_impl)
    with C.hf_checkpoint(args.size, ctc=True, model_dir=args.model, **overrides) as path:
        config = flax_d2v.api.pretrained.load_any(path)[0] if args.model else C.SIZES[args.size]().replace(**overrides)
        frames = int(flax_d2v.modeling.feat_extract_output_lengths(config, x.shape[1]))
        labels = encode_labels(texts, vocab, max_len=frames // 2)
        if args.model:  # its own vocabulary: fold our ids into it, never onto the blank
            labels = np.where(labels > 0, 1 + (labels - 1) % (config.vocab_size - 1), labels)
        module, params = flax_module(path, args.dtype, args.scan_layers)
        # One GPU, two allocators: on a GPU PyTorch is timed first and freed, then JAX runs with all
        # the memory (interleaving, as on the CPU, ran PyTorch out of memory at 64 x 10 s beside JAX's pool).
        sequential = jax.default_backend() == "gpu" and not args.no_torch
        fx = None if sequential else flax_side(module, params, x, labels, args.seed)
        tx = (
            None
            if args.no_torch
            else torch_side(
                path, x, labels, {"layerdrop": 0.0, "ctc_loss_reduction": "sum", **RECIPES[args.recipe]}, args.dtype
            )
        )
    first: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    if sequential:
        first["pytorch"] = C.timed(tx["call"])[1]
        times.update(C.interleaved_times({"pytorch": tx["call"]}, args.repeats, args.warmup))
        tx["call"] = None
        C.torch_release()
        fx = flax_side(module, params, x, labels, args.seed)
    sides = {"flax": fx["call"]} if tx is None or sequential else {"flax": fx["call"], "pytorch": tx["call"]}
    first.update({name: C.timed(call)[1] for name, call in sides.items()})
    times.update(C.interleaved_times(sides, args.repeats, args.warmup))
    # the ceiling: the better of the measurements before and after (foreign load only lowers it)
    result["matmul_peak"] = peak = C.best_peak(start_peak, C.matmul_peak(args.peak_sizes, dtype=args.dtype))
    flops = C.ctc_train_flops(fx["module"].config, args.batch, x.shape[1])
    audio_s = args.batch * x.shape[1] / C.SAMPLE_RATE
    result.update(
        frames=frames,
        label_lengths=[int((r >= 0).sum()) for r in labels],
        analytic_flops=flops,
        matmul_peak_gflops=peak["gflops"],
    )
    for name in times:
        s = C.summarize(times[name])
        rate = flops["total"] / s["median_s"] / 1e9
        call = sides.get(name)
        result[name] = {
            **s,
            "first_call_s": first[name],
            "x_real_time": audio_s / s["median_s"],
            "gflops_per_s": rate,
            "fraction_of_matmul_peak": rate / peak["gflops"],
            "peak_rss_growth_bytes": C.peak_rss_growth(call) if call else None,
        }
    result["flax"].update(
        eval_loss=fx["eval_loss"],
        lower_s=fx["lower_s"],
        compile_s=fx["compile_s"],
        xla_flops=fx["xla_flops"],
        xla_memory=fx["xla_memory"],
    )
    if tx is not None:
        result["pytorch"].update(eval_loss=tx["eval_loss"], adamw=tx["adamw"], device=tx["device"])
        result["eval_loss_rel_diff"] = abs(fx["eval_loss"] - tx["eval_loss"]) / abs(tx["eval_loss"])
        result["speedup_flax_over_pytorch"] = C.ratio(result["flax"]["median_s"], result["pytorch"]["median_s"])
    result["flax"]["precision"] = "bf16" if args.dtype == "bfloat16" else "default"
    result["flax"]["scan_layers"] = bool(args.scan_layers)
    ablate = [a for a in (args.ablate or "").split(",") if a]
    if ablate:
        result["ablations"] = run_ablations(
            module,
            params,
            x,
            labels,
            ablate,
            args.repeats,
            args.warmup,
            result["flax"]["median_s"],
            flops["total"],
            peak["gflops"],
        )
    result["device_peak_bytes"] = C.device_peak_bytes()
    result["loadavg_end"] = C.load_average()
    return result


def format_report(r: dict[str, Any]) -> str:
    f, t = r["flax"], r.get("pytorch")

    def rate(s):
        return f"{s['gflops_per_s']:.0f} ({100 * s['fraction_of_matmul_peak']:.0f}%)"

    header = [
        "step",
        "Flax ms",
        "PyTorch ms",
        "PT/Flax",
        "Flax GFLOP/s (% peak)",
        "PT GFLOP/s (% peak)",
        "Flax compile s",
        "peak mem Flax / PT",
        "eval loss Flax / PT",
    ]
    row = [
        f"CTC {r['batch']} x {r['seconds']:g} s",
        f"{1000 * f['median_s']:.0f}",
        f"{1000 * t['median_s']:.0f}" if t else "-",
        f"{r['speedup_flax_over_pytorch']:.2f}" if t else "-",
        rate(f),
        rate(t) if t else "-",
        f"{f['compile_s']:.1f}",
        f"{C.fmt_bytes(f['peak_rss_growth_bytes'])} / {C.fmt_bytes(t['peak_rss_growth_bytes']) if t else '-'}",
        f"{f['eval_loss']:.2f} / {t['eval_loss']:.2f}" if t else f"{f['eval_loss']:.2f}",
    ]
    return C.markdown_table(header, [row])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(C.SIZES), default="base", help="random-weight model size")
    p.add_argument("--model", default=None, help="a transformers CTC checkpoint directory instead")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side before timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="compute dtype (params and optimizer state stay float32 on both sides)",
    )
    p.add_argument("--torch-threads", type=int, default=None, help="default: all cores this process may use")
    p.add_argument("--no-torch", action="store_true", help="time Flax alone")
    p.add_argument("--peak-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1024, 2048])
    p.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="fairseq",
        help="dropouts of the timed step (default fairseq's fine-tuning recipe; hf = the config's 0.1s)",
    )
    p.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="nn.scan over the layers (one layer body compiled: the fast-compile layout)",
    )
    p.add_argument(
        "--ablate", default=None, help="comma list of parts to remove one at a time: " + ", ".join(ABLATIONS)
    )
    p.add_argument(
        "--prng",
        choices=["threefry2x32", "rbg", "unsafe_rbg"],
        default=None,
        help="JAX's PRNG implementation for the run (dropout bits: rbg is cheaper on accelerators)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write the full result as JSON ('-' for stdout)")
    return p


def format_ablations(r: dict[str, Any]) -> str:
    rows = [
        [
            a["ablation"],
            a["what"],
            f"{1000 * a['median_s']:.1f}",
            f"{1000 * a['saves_s']:.1f}",
            f"{100 * a['saves_fraction']:.0f}%",
        ]
        for a in r.get("ablations", [])
    ]
    return C.markdown_table(["ablation", "removes", "step ms", "saves ms", "share of step"], rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prng:
        jax.config.update("jax_default_prng_impl", args.prng)
    bad = [a for a in (args.ablate or "").split(",") if a and a not in ABLATIONS]
    if bad:
        print(
            f"bench/train.py: --ablate: unknown {', '.join(bad)}; choose from {', '.join(ABLATIONS)}", file=sys.stderr
        )
        return 2
    result = benchmark(args)
    print(format_report(result), file=sys.stderr)
    if result.get("ablations"):
        print(format_ablations(result), file=sys.stderr)
    if args.json:
        C.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
