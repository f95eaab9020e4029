"""d2v embed --model M --layer {N|all|last} --out OUT FILE...: hidden states as float32 .npz.

Arrays are named `layer_0` ... `layer_L` (layer_0 is the encoder input after the positional conv
and LayerNorm, layer_i the output of transformer layer i, as transformers' `hidden_states`), each
(frames, hidden). Audio is preprocessed as the checkpoint's preprocessor_config.json says (HF
normalisation, eps 1e-7). With several files, OUT is a directory holding one `<name>.npz` each.

`--xvector` (an x-vector model, transformers' `Data2VecAudioForXVector`, or data2vec 2.0's): one
speaker embedding per file instead, the array `xvector` (xvector_output_dim,) in each .npz, at
`--precision` and with the same preprocessing.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from flax_d2v.api.classify import Classifier
from flax_d2v.api.pretrained import load_model
from flax_d2v.audio import HF_NORM_EPS, load_audio, pad_batch
from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_write_bytes
from flax_d2v.paths import as_path
from flax_d2v.precision import add_argument as add_precision_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files")
    p.add_argument("--model", required=True, help="flax-d2v dir, HF dir, fairseq .pt, or hub id")
    p.add_argument("--layer", default="last", help="N, 'all' or 'last' (default: last)")
    p.add_argument("--out", required=True, help="OUT.npz for one file; a directory for several")
    p.add_argument("--strict-audio", action="store_true", help="refuse audio that is not 16 kHz mono")
    add_precision_argument(p, "highest", "embeddings equal PyTorch's fp32 on every platform")
    p.add_argument(
        "--xvector",
        action="store_true",
        help="one x-vector per file (array 'xvector') from an x-vector model; --layer is ignored",
    )


def parse_layer(spec: str, num_layers: int) -> list[int]:
    if spec == "all":
        return list(range(num_layers + 1))
    if spec == "last":
        return [num_layers]
    try:
        n = int(spec)
    except ValueError:
        raise D2VError(f"--layer {spec!r}: expected an integer, 'all' or 'last'") from None
    if not 0 <= n <= num_layers:
        raise D2VError(f"--layer {n}: the model has layers 0..{num_layers}")
    return [n]


def embed_arrays(
    module, params, wave: np.ndarray, layers: list[int], do_normalize: bool, eps: float | None = None
) -> dict[str, np.ndarray]:
    values, _ = pad_batch([wave], do_normalize=do_normalize, eps=HF_NORM_EPS if eps is None else eps)
    out = module.apply({"params": params}, jnp.asarray(values), output_hidden_states=True)
    return {f"layer_{i}": np.asarray(out.hidden_states[i][0], np.float32) for i in layers}


def _save_npz(target: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(target, buf.getvalue())


def run_xvector(args: argparse.Namespace, out: Path, several: bool) -> int:
    def warn(message: str) -> None:
        print(f"d2v embed: {message}", file=sys.stderr, flush=True)

    failures = 0
    runner = Classifier(args.model, batch_size=1, precision=args.precision)
    for r in runner.embed(args.files, strict_audio=args.strict_audio, warn=warn):
        if r.error is not None:
            failures += 1
            continue
        target = out / (Path(r.path).stem + ".npz") if several else out
        _save_npz(target, {"xvector": r.embedding})
        print(f"{r.path}	{target}	xvector ({r.embedding.shape[0]},)")
    return 1 if failures else 0


def run(args: argparse.Namespace) -> int:
    out = as_path(args.out)  # a file or directory, or a bucket URL
    several = len(args.files) > 1
    if several and out.suffix == ".npz":
        raise D2VError(f"--out {out}: with several files --out must be a directory")
    if args.xvector:
        return run_xvector(args, out, several)
    loaded = load_model(args.model, precision=args.precision)
    module, params, pre = loaded.module, loaded.params, loaded.preprocessor
    layers = parse_layer(args.layer, module.config.num_hidden_layers)
    failures = 0
    for f in args.files:
        try:
            wave = load_audio(f, strict=args.strict_audio)
        except D2VError as e:
            print(f"d2v embed: error: {e}", file=sys.stderr)
            failures += 1
            continue
        arrays = embed_arrays(module, params, wave, layers, pre.do_normalize, pre.normalize_eps)
        target = out / (Path(f).stem + ".npz") if several else out
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(target, buf.getvalue())
        frames, hidden = next(iter(arrays.values())).shape
        print(f"{f}\t{target}\t{len(arrays)} layer(s) x ({frames}, {hidden})")
    return 1 if failures else 0
