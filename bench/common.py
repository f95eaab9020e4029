"""Shared machinery of the Flax-vs-PyTorch benchmarks (`bench/infer.py`, `bench/train.py`).

Why each piece is the way it is:
- Timing interleaves the contenders (A B, B A, A B, ...) after warm-up and reports the median:
  the machine these run on is shared, and interleaving makes a burst of foreign load hit both
  sides alike, so the *ratio* stays meaningful even when the absolute times drift.
- FLOPs are counted analytically from the config (a matmul of (m,k)x(k,n) is 2mkn FLOPs; norms,
  activations and softmax are not counted), so GFLOP/s compares against the measured matmul peak
  of the same machine. XLA's own `cost_analysis()` count is reported beside it as a cross-check.
- Peak memory is the growth of the process's peak resident set during one call (Linux resets the
  high-water mark through `/proc/self/clear_refs`), the same measure for both frameworks; for
  JAX the compiled executable's buffer sizes (`memory_analysis()`) are reported too.
- PyTorch and transformers are imported inside functions: they are an optional extra.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flax_d2v.config import Data2VecAudioConfig, base_config, large_config, tiny_config
from flax_d2v.fileio import atomic_write_text
from flax_d2v.modeling import feat_extract_output_lengths

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16000
SIZES = {"base": base_config, "large": large_config, "tiny": tiny_config}


# ----------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def machine_info(torch_threads: int | None = None) -> dict[str, Any]:
    """Where and with what the numbers were made (goes into every JSON result)."""
    import jax

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": load_average(),
        "versions": library_versions(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    with contextlib.suppress(OSError, ValueError):
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        info["memory_gib"] = round(kb / 2**20, 1)
    if torch_threads is not None:
        info["torch_threads"] = torch_threads
    if jax.default_backend() == "gpu":
        info["gpu"] = jax.devices()[0].device_kind
    return info


def load_average() -> list[float] | None:
    with contextlib.suppress(OSError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def set_torch_threads(threads: int | None) -> int:
    """Give PyTorch the same cores XLA uses (all available ones, unless told otherwise)."""
    import torch

    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- timing


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of `repeats` calls of each function, interleaved, after `warmup` untimed calls each.

    Each function must block until its result is ready (JAX: `block_until_ready`). The order is
    reversed every round (A B, B A, ...) so neither side always runs right after the other.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    ts = sorted(times)
    q1, q3 = (ts[len(ts) // 4], ts[(3 * len(ts)) // 4]) if len(ts) >= 4 else (ts[0], ts[-1])
    return {"median_s": statistics.median(ts), "min_s": ts[0], "max_s": ts[-1], "iqr_s": q3 - q1, "n": len(ts)}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError, AttributeError, ValueError):
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    return None


def peak_rss_growth(fn: Callable[[], Any]) -> int | None:
    """Bytes the process's peak resident set rose above its current size during `fn()` (None if unknown).

    Measures what the call really touched (activations, workspace, allocator slack) the same way
    for both frameworks: freed heap memory is first returned to the OS (`malloc_trim`), else memory
    glibc kept from an earlier call would hide the growth. Needs Linux's `/proc/self/clear_refs`.
    """
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so "before" is what is live
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(peak - before, 0) * 1024


def xla_memory(compiled: Any) -> dict[str, int] | None:
    """Argument/output/temp bytes of a compiled JAX executable (XLA's buffer assignment)."""
    with contextlib.suppress(Exception):
        m = compiled.memory_analysis()
        if m is not None:
            return {
                "argument_bytes": int(m.argument_size_in_bytes),
                "output_bytes": int(m.output_size_in_bytes),
                "temp_bytes": int(m.temp_size_in_bytes),
            }
    return None


def xla_flops(compiled: Any) -> float | None:
    with contextlib.suppress(Exception):
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        return float(ca["flops"])
    return None


# ----------------------------------------------------------------------------- peak


def matmul_peak(
    sizes: Sequence[int] = (1024, 2048),
    repeats: int = 5,
    dtype: str = "float32",
    extra_shapes: Sequence[tuple[int, int, int]] = ((2048, 768, 3072),),
) -> dict[str, Any]:
    """The machine's attainable dense-matmul rate: best GFLOP/s of jitted `jnp.matmul`s.

    Square `sizes` plus `extra_shapes` (m, k, n), by default the base model's FFN shape at 41 s of
    frames, since XLA's CPU matmul library can run that shape faster than a square one. This is
    the ceiling the model's matmuls run against (same library, same threads); numpy's BLAS is
    measured beside it for reference. Take it on a quiet machine: foreign load lowers it.
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    best: dict[str, float] = {}
    per_shape = []
    f = jax.jit(jnp.matmul)
    for m, k, n in [(s, s, s) for s in sizes] + [tuple(e) for e in extra_shapes]:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        fns = {"jax": lambda ja=ja, jb=jb: f(ja, jb).block_until_ready()}
        if dtype == "float32" and jax.default_backend() == "cpu":
            fns["numpy"] = lambda a=a, b=b: a @ b
        t = interleaved_times(fns, repeats, warmup=1)
        row: dict[str, Any] = {"shape": [m, k, n]}
        for name, ts in t.items():
            gflops = 2 * m * k * n / min(ts) / 1e9
            row[name] = round(gflops, 1)
            best[name] = max(best.get(name, 0.0), gflops)
        per_shape.append(row)
    return {
        "gflops": round(best["jax"], 1),
        "numpy_gflops": round(best["numpy"], 1) if "numpy" in best else None,
        "dtype": dtype,
        "per_shape": per_shape,
    }


def best_peak(*peaks: dict[str, Any]) -> dict[str, Any]:
    """The higher of several peak measurements (start and end of a run): load only ever lowers it."""
    best = max(peaks, key=lambda p: p["gflops"])
    return {**best, "measurements_gflops": [p["gflops"] for p in peaks]}


# ----------------------------------------------------------------------------- FLOPs


def forward_flops(config: Data2VecAudioConfig, batch: int, num_samples: int, lm_head: bool = False) -> dict[str, float]:
    """Analytic FLOPs of one forward (2 per multiply-add), by part; "total" sums them.

    conv feature encoder, feature projection, grouped positional convolutions, attention
    projections, attention scores and weighted sum, FFN, (CTC head). Elementwise work is left out.
    """
    c = config
    flops = {"feature_encoder": 0.0}
    length, cin = num_samples, 1
    for dim, kernel, stride in zip(c.conv_dim, c.conv_kernel, c.conv_stride, strict=True):
        length = (length - kernel) // stride + 1
        flops["feature_encoder"] += 2.0 * length * kernel * cin * dim
        cin = dim
    t = int(feat_extract_output_lengths(c, num_samples))
    h, layers = c.hidden_size, c.num_hidden_layers
    flops["feature_projection"] = 2.0 * t * c.conv_dim[-1] * h
    group_in = h // c.num_conv_pos_embedding_groups
    flops["pos_conv"] = 2.0 * t * c.conv_pos_kernel_size * group_in * h * c.num_conv_pos_embeddings
    flops["attention_proj"] = layers * 2.0 * t * h * h * 4
    flops["attention_scores"] = layers * 2.0 * t * t * h * 2
    flops["ffn"] = layers * 2.0 * t * h * c.intermediate_size * 2
    if lm_head:
        flops["lm_head"] = 2.0 * t * h * c.vocab_size
    flops = {k: v * batch for k, v in flops.items()}
    flops["total"] = sum(flops.values())
    return flops


def ctc_train_flops(config: Data2VecAudioConfig, batch: int, num_samples: int) -> dict[str, float]:
    """Analytic FLOPs of one CTC step with the feature encoder frozen.

    Forward of everything; backward costs two forwards (input and weight gradients) for every part
    behind the frozen encoder, except the feature projection, whose input needs no gradient (one).
    """
    fwd = forward_flops(config, batch, num_samples, lm_head=True)
    trainable = fwd["total"] - fwd["feature_encoder"]
    backward = 2.0 * (trainable - fwd["feature_projection"]) + fwd["feature_projection"]
    return {"forward": fwd["total"], "backward": backward, "total": fwd["total"] + backward}


def _transformer_flops(config: Any, frames: int) -> float:
    """One clip's transformer layers over `frames` frames (forward_flops' attention and FFN terms)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    return layers * (
        2.0 * frames * h * h * 4 + 2.0 * frames * frames * h * 2 + 2.0 * frames * h * config.intermediate_size * 2
    )


def _backward(trainable_forward: float, first_conv: float) -> float:
    """Backward of trained parts: two forwards (input and weight gradients), except the first conv
    layer, whose input (the waveform) needs no gradient: one."""
    return 2.0 * (trainable_forward - first_conv) + first_conv


def data2vec_pretrain_flops(config: Data2VecAudioConfig, batch: int, num_samples: int) -> dict[str, float]:
    """Analytic FLOPs of one data2vec 1.0 update (`train/data2vec_objective.py`), counted as `ctc_train_flops`.

    Student: the whole model on every frame (masked ones replaced by `mask_emb`) and `final_proj`,
    forward and backward (nothing is frozen in pretraining). Teacher (EMA, no gradient): positional
    conv and transformer on the student's unmasked projected features, forward only.
    """
    fwd = forward_flops(config, batch, num_samples)
    t = int(feat_extract_output_lengths(config, num_samples))
    first_conv = 2.0 * ((num_samples - config.conv_kernel[0]) // config.conv_stride[0] + 1) * config.conv_kernel[0]
    first_conv *= config.conv_dim[0] * batch
    student = fwd["total"] + 2.0 * t * config.hidden_size**2 * batch  # + final_proj
    teacher = fwd["pos_conv"] + fwd["attention_proj"] + fwd["attention_scores"] + fwd["ffn"]
    backward = _backward(student, first_conv)
    return {"student": student, "backward": backward, "teacher": teacher, "total": student + backward + teacher}


def data2vec2_pretrain_flops(
    config: Any, batch: int, num_samples: int, clone_batch: int, kept: int
) -> dict[str, float]:
    """Analytic FLOPs of one data2vec 2.0 update (`train/data2vec2_objective.py`), counted as `ctc_train_flops`.

    Local features (conv encoder + projection) once per clip; per clone (B x clone_batch rows): the
    positional conv over all T frames, the transformer over the `kept` unmasked frames, the decoder
    (grouped convs, then `proj`) over all T frames; all of it forward and backward. Teacher (EMA, no
    gradient): positional conv and transformer over all T frames of each clip, forward only.
    """
    one = forward_flops(config, 1, num_samples)
    t = int(feat_extract_output_lengths(config, num_samples))
    n = batch * clone_batch
    k, g, h = config.decoder_kernel, config.decoder_groups, config.hidden_size
    decoder, width = 0.0, h
    for _ in range(config.decoder_layers):
        decoder += 2.0 * t * k * (width // g) * config.decoder_dim
        width = config.decoder_dim
    decoder += 2.0 * t * config.decoder_dim * h
    first_conv = 2.0 * ((num_samples - config.conv_kernel[0]) // config.conv_stride[0] + 1) * config.conv_kernel[0]
    first_conv *= config.conv_dim[0] * batch
    local = batch * (one["feature_encoder"] + one["feature_projection"])
    student = local + n * (one["pos_conv"] + _transformer_flops(config, kept) + decoder)
    teacher = batch * (one["pos_conv"] + _transformer_flops(config, t))
    backward = _backward(student, first_conv)
    return {
        "student": student,
        "decoder": n * decoder,
        "backward": backward,
        "teacher": teacher,
        "total": student + backward + teacher,
    }


# ----------------------------------------------------------------------------- data


def find_speech_dir() -> Path:
    """../shared/speech beside the checkout, or $D2V_SHARED_SPEECH (as tests/conftest.py)."""
    env = os.environ.get("D2V_SHARED_SPEECH")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "speech", REPO / "shared" / "speech"]:
        if (cand / "16k").is_dir():
            return cand
    raise FileNotFoundError("real speech not found: set D2V_SHARED_SPEECH to the folder holding 16k/*.wav")


def load_clips(speech_dir: Path | None = None) -> list[tuple[np.ndarray, str]]:
    """(normalised 16 kHz waveform, transcript) of every clip under `16k/`, sorted by file name."""
    import csv

    from flax_d2v.audio import load_audio, normalize

    d = speech_dir or find_speech_dir()
    texts: dict[str, str] = {}
    tsv = d / "transcripts.tsv"
    if tsv.is_file():
        with tsv.open(newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                texts[Path(row["path"]).name] = row.get("text", "")
    clips = []
    for wav in sorted((d / "16k").glob("*.wav")):
        clips.append((normalize(np.asarray(load_audio(wav), np.float32)), texts.get(wav.name, "")))
    if not clips:
        raise FileNotFoundError(f"{d / '16k'}: no .wav files")
    return clips


def speech_batch(clips: list[tuple[np.ndarray, str]], batch: int, seconds: float) -> tuple[np.ndarray, list[str]]:
    """(batch, samples) float32 of real speech: clips concatenated until `seconds` is reached.

    Row i starts at clip i (mod the number of clips), so the rows differ. The transcript of a row
    is the text of the clips it holds (the last one possibly cut).
    """
    n = int(round(seconds * SAMPLE_RATE))
    rows, texts = [], []
    for i in range(batch):
        parts, words, have, j = [], [], 0, i
        while have < n:
            wav, text = clips[j % len(clips)]
            parts.append(wav)
            words.append(text)
            have += len(wav)
            j += 1
        rows.append(np.concatenate(parts)[:n])
        texts.append(" ".join(words))
    return np.stack(rows).astype(np.float32), texts


# ----------------------------------------------------------------------------- models


@contextlib.contextmanager
def hf_checkpoint(
    size: str, ctc: bool, model_dir: str | None = None, seed: int = 0, **config_overrides: Any
) -> Iterator[str]:
    """A transformers checkpoint directory both frameworks load: `model_dir`, or random weights of `size`.

    Random weights are enough for speed (the arithmetic does not depend on the values) and need no
    network; pass `--model` to time a downloaded checkpoint instead.
    """
    if model_dir is not None:
        yield model_dir
        return
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cfg = SIZES[size]().replace(**config_overrides)
    hf_cfg = transformers.Data2VecAudioConfig(**cfg.to_dict())
    torch.manual_seed(seed)
    cls = transformers.Data2VecAudioForCTC if ctc else transformers.Data2VecAudioModel
    model = cls(hf_cfg).eval()
    with tempfile.TemporaryDirectory(prefix="d2v-bench-") as tmp:
        model.save_pretrained(tmp)
        del model
        yield tmp


def torch_device() -> str:
    """ "cuda" when JAX runs on a GPU and this PyTorch build sees one, else "cpu" (the two sides share a device)."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_sync(device: str) -> None:
    """Wait for queued CUDA work, so a timed PyTorch call ends when its kernels do (no-op on CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def torch_release() -> None:
    """Give PyTorch's cached GPU memory back (before the other framework runs on the same GPU)."""
    import gc

    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def device_peak_bytes() -> dict[str, int | None]:
    """Accelerator peak memory since start (GPU only): JAX's allocator and PyTorch's CUDA allocator."""
    import jax

    out: dict[str, int | None] = {"jax": None, "torch": None}
    if jax.default_backend() != "cpu":
        with contextlib.suppress(Exception):
            out["jax"] = int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            out["torch"] = int(torch.cuda.max_memory_allocated())
    return out


def torch_model(path: str, ctc: bool, **config_overrides: Any):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cls = transformers.Data2VecAudioForCTC if ctc else transformers.Data2VecAudioModel
    return cls.from_pretrained(path, **config_overrides)


# ----------------------------------------------------------------------------- output


def ratio(a: float, b: float) -> float:
    return b / a if a > 0 else math.nan


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, result: dict[str, Any]) -> None:
    """`-` prints to stdout; a path is written atomically (temp file, then rename)."""
    text = json.dumps(result, indent=2, default=float)
    if path == "-":
        print(text)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")
