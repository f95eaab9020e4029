"""Inference speed: the jitted Flax forward against transformers' PyTorch forward, same weights, one process.

    python bench/infer.py                                # base size, all cases, 5 timed calls each
    python bench/infer.py --cases 1x10,8x10 --repeats 10 --json results/infer.json

Both sides load one transformers checkpoint (random weights of `--size`, or `--model DIR`), run
on the same real speech (../shared/speech/16k, clips concatenated to each length), and are timed
interleaved (median after warm-up). Per case it reports the time, how many times faster than real
time, the speed ratio (PyTorch time / Flax time: above 1 means Flax is faster), compile time,
peak memory, achieved GFLOP/s against the analytic FLOP count and against the measured matmul peak,
and the largest difference between the two outputs (a check that both ran the same model).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

import flax_d2v  # noqa: E402

DEFAULT_CASES = "1x1,1x5,1x10,1x30,8x10"
DTYPES = {"float32": (jnp.float32, "float32"), "bfloat16": (jnp.bfloat16, "bfloat16")}


def parse_cases(text: str) -> list[tuple[int, float]]:
    """ "1x10,8x10" -> [(1, 10.0), (8, 10.0)]: batch x seconds."""
    cases = []
    for item in text.split(","):
        b, _, s = item.strip().partition("x")
        cases.append((int(b), float(s)))
    return cases


def flax_forward(module: Any, params: Any, x: np.ndarray) -> dict[str, Any]:
    """Jit, lower and compile the forward for this shape; returns the callable and its costs."""
    fn = jax.jit(lambda p, v: module.apply({"params": p}, v).last_hidden_state)
    xj = jnp.asarray(x)
    lowered, lower_s = C.timed(lambda: fn.lower(params, xj))
    compiled, compile_s = C.timed(lowered.compile)
    return {
        "call": lambda: compiled(params, xj).block_until_ready(),
        "lower_s": lower_s,
        "compile_s": compile_s,
        "xla_flops": C.xla_flops(compiled),
        "xla_memory": C.xla_memory(compiled),
        "output": lambda: np.asarray(compiled(params, xj), np.float32),
    }


def torch_forward(model: Any, x: np.ndarray, dtype: str, device: str) -> dict[str, Any]:
    import torch

    xt = torch.from_numpy(x).to(device=device, dtype=getattr(torch, dtype))

    def call():
        with torch.inference_mode():
            out = model(xt).last_hidden_state
        C.torch_sync(device)
        return out

    return {"call": call}


def side_report(times: list[float], audio_s: float, flops: float) -> dict[str, Any]:
    s = C.summarize(times)
    return {**s, "x_real_time": audio_s / s["median_s"], "gflops_per_s": flops / s["median_s"] / 1e9}


def run_case(
    module: Any,
    params: Any,
    model: Any,
    clips: list,
    batch: int,
    seconds: float,
    repeats: int,
    warmup: int,
    dtype: str,
    device: str = "cpu",
    compiled_model: Any = None,
) -> dict[str, Any]:
    x, _ = C.speech_batch(clips, batch, seconds)
    flops = C.forward_flops(module.config, batch, x.shape[1])
    fx = flax_forward(module, params, x)
    sides = {"flax": fx["call"]}
    first: dict[str, float] = {}
    if model is not None:
        tx = torch_forward(model, x, dtype, device)
        sides["pytorch"] = tx["call"]
        _, first["pytorch"] = C.timed(tx["call"])
    if compiled_model is not None:  # torch.compile: its first call (compilation) is reported, not timed
        sides["pytorch_compile"] = torch_forward(compiled_model, x, dtype, device)["call"]
        _, first["pytorch_compile"] = C.timed(sides["pytorch_compile"])
    _, first["flax"] = C.timed(fx["call"])
    times = C.interleaved_times(sides, repeats, warmup)
    audio_s = batch * x.shape[1] / C.SAMPLE_RATE
    out: dict[str, Any] = {
        "batch": batch,
        "seconds": seconds,
        "samples": int(x.shape[1]),
        "frames": int(flax_d2v.modeling.feat_extract_output_lengths(module.config, x.shape[1])),
        "analytic_flops": flops,
        "analytic_gflop_per_audio_s": flops["total"] / audio_s / 1e9,
    }
    for name, call in sides.items():
        out[name] = side_report(times[name], audio_s, flops["total"])
        out[name]["first_call_s"] = first[name]
        out[name]["peak_rss_growth_bytes"] = C.peak_rss_growth(call)
    out["flax"].update(
        lower_s=fx["lower_s"], compile_s=fx["compile_s"], xla_flops=fx["xla_flops"], xla_memory=fx["xla_memory"]
    )
    if model is not None:
        ref = sides["pytorch"]().float().cpu().numpy()
        got = fx["output"]()
        out["max_abs_diff"] = float(np.abs(got - ref).max())
        out["ref_max_abs"] = float(np.abs(ref).max())
        out["speedup_flax_over_pytorch"] = C.ratio(out["flax"]["median_s"], out["pytorch"]["median_s"])
    if "pytorch_compile" in out:
        out["speedup_flax_over_pytorch_compile"] = C.ratio(out["flax"]["median_s"], out["pytorch_compile"]["median_s"])
    return out


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every case; returns the JSON-ready result (also what the smoke test checks)."""
    threads = None if args.no_torch else C.set_torch_threads(args.torch_threads)
    result: dict[str, Any] = {
        "benchmark": "infer",
        "machine": C.machine_info(threads),
        "size": args.size,
        "model": args.model,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    start_peak = C.matmul_peak(args.peak_sizes, dtype=args.dtype)
    print(f"matmul peak: {start_peak['gflops']:.0f} GFLOP/s (jnp.matmul {args.dtype})", file=sys.stderr)
    clips = C.load_clips()
    jdtype, tdtype = DTYPES[args.dtype]
    with C.hf_checkpoint(args.size, ctc=False, model_dir=args.model) as path:
        # float32 runs at the platform's default precision (TF32 on GPU), as PyTorch's own default does
        # for its cuDNN convolutions; `--precision highest` times true fp32.
        precision = args.precision or ("bf16" if args.dtype == "bfloat16" else "default")
        result["flax_precision"] = precision
        module, params = flax_d2v.from_pretrained(path, precision=precision)
        model, device, compiled_model = None, "cpu", None
        if not args.no_torch:
            import torch

            device = C.torch_device()
            result["torch_device"] = device
            model = C.torch_model(path, ctc=False).to(device=device, dtype=getattr(torch, tdtype)).eval()
            result["torch_attn_implementation"] = getattr(model.config, "_attn_implementation", None)
            if args.torch_compile:
                compiled_model = torch.compile(model)
    if hasattr(module, "data2vec_audio"):  # a CTC checkpoint given with --model: time the encoder
        params = params["data2vec_audio"]
        module = flax_d2v.modeling.Data2VecAudioModel(module.config, dtype=jdtype, precision=module.precision)
    params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jdtype), params))
    result["cases"] = []
    for batch, seconds in parse_cases(args.cases):
        case = run_case(
            module, params, model, clips, batch, seconds, args.repeats, args.warmup, tdtype, device, compiled_model
        )
        result["cases"].append(case)
        print(
            f"{batch} x {seconds:g} s: Flax {case['flax']['median_s']:.3f} s"
            + (f", PyTorch {case['pytorch']['median_s']:.3f} s" if model is not None else ""),
            file=sys.stderr,
        )
    # the ceiling: the better of the measurements before and after (foreign load only lowers it)
    result["matmul_peak"] = peak = C.best_peak(start_peak, C.matmul_peak(args.peak_sizes, dtype=args.dtype))
    for case in result["cases"]:
        for side in ("flax", "pytorch", "pytorch_compile"):
            if side in case:
                case[side]["fraction_of_matmul_peak"] = case[side]["gflops_per_s"] / peak["gflops"]
    result["device_peak_bytes"] = C.device_peak_bytes()
    result["loadavg_end"] = C.load_average()
    return result


HEADER = [
    "batch x s",
    "Flax ms",
    "PyTorch ms",
    "PT/Flax",
    "PT compile ms",
    "PTc/Flax",
    "Flax x RT",
    "PT x RT",
    "Flax GFLOP/s (% peak)",
    "PT GFLOP/s (% peak)",
    "Flax compile s",
    "peak mem Flax / PT",
    "max |diff|",
]


def format_row(case: dict[str, Any]) -> list[str]:
    f, t = case["flax"], case.get("pytorch")

    def rate(s):
        return f"{s['gflops_per_s']:.0f} ({100 * s['fraction_of_matmul_peak']:.0f}%)"

    row = [
        f"{case['batch']} x {case['seconds']:g}",
        f"{1000 * f['median_s']:.1f}",
        f"{1000 * t['median_s']:.1f}" if t else "-",
        f"{case['speedup_flax_over_pytorch']:.2f}" if t else "-",
        f"{1000 * case['pytorch_compile']['median_s']:.1f}" if "pytorch_compile" in case else "-",
        f"{case['speedup_flax_over_pytorch_compile']:.2f}" if "pytorch_compile" in case else "-",
        f"{f['x_real_time']:.1f}",
        f"{t['x_real_time']:.1f}" if t else "-",
        rate(f),
        rate(t) if t else "-",
        f"{f['compile_s']:.1f}",
        f"{C.fmt_bytes(f['peak_rss_growth_bytes'])} / {C.fmt_bytes(t['peak_rss_growth_bytes']) if t else '-'}",
        f"{case['max_abs_diff']:.1e}" if t else "-",
    ]
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(C.SIZES), default="base", help="random-weight model size")
    p.add_argument("--model", default=None, help="a transformers checkpoint directory instead of random weights")
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma list of BATCHxSECONDS (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side and case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side before timing")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype of both sides")
    p.add_argument("--torch-threads", type=int, default=None, help="default: all cores this process may use")
    p.add_argument("--no-torch", action="store_true", help="time Flax alone")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile of the same model")
    p.add_argument(
        "--precision",
        choices=["highest", "default", "bf16"],
        default=None,
        help="Flax precision policy (default: default for float32, bf16 for bfloat16)",
    )
    p.add_argument(
        "--peak-sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1024, 2048],
        help="square matmul sizes for the peak measurement",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write the full result as JSON ('-' for stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = benchmark(args)
    print(
        f"matmul peak {result['matmul_peak']['gflops']:.0f} GFLOP/s; load average {result['loadavg_end']}",
        file=sys.stderr,
    )
    print(C.markdown_table(HEADER, [format_row(c) for c in result["cases"]]), file=sys.stderr)
    if args.json:
        C.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
