"""`d2v prepare`: pack a manifest's clips into ArrayRecord shards plus an index (`shards.py`).

    from flax_d2v.train.prepare import prepare
    report = prepare("train.tsv", "data/train", shards=8, audio="pcm16")   # then --train data/train

Every clip is read once through the training loader's own audio path (`Manifest.load`: decode,
downmix, resample to 16 kHz), rounded to 16 bits and written with its transcript, its other TSV
columns (a classification label, a speaker) and its length, in manifest order, shard after shard
(`--shards N` contiguous ranges). Decoding runs on a thread pool (libsndfile and soxr release the
GIL); the order of the output does not depend on it. A clip that does not load is named in one
line on stderr and left out (listed in the index under `skipped`), or, with `strict`, stops the
packing with that line. The directory appears only when complete: it is written under a
temporary name beside OUT_DIR and renamed (`fileio.atomic_dir`).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from flax_d2v.audio import SAMPLE_RATE
from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_dir
from flax_d2v.train import shards as S
from flax_d2v.train.manifests import Manifest, read_lines, read_manifest, tsv_rows

# Clips per shard when --shards is not given: LibriSpeech's 960 h (281k clips, 12.3 s on average)
# in 138 shards of ~7 h, ~800 MiB of pcm16 each. By count, so that no clip is opened to plan it.
DEFAULT_CLIPS_PER_SHARD = 2048
CHUNK = 64  # clips decoded ahead per round of the thread pool: bounds the memory held


def prepare(
    spec: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shards: int | None = None,
    audio: str = "pcm16",
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Write OUT_DIR (see the module docstring); returns {"clips", "skipped", "shards", "seconds", "bytes"}."""
    if audio not in S.AUDIO_FORMATS:
        raise D2VError(f"--format: expected one of {', '.join(S.AUDIO_FORMATS)}, got {audio!r}")
    if shards is not None and shards < 1:
        raise D2VError(f"--shards: must be >= 1, got {shards}")
    manifest = read_manifest(spec)
    columns = extra_columns(spec)
    n = len(manifest)
    if shards is None:
        shards = -(-n // DEFAULT_CLIPS_PER_SHARD)
    shards = min(shards, n)
    bounds = [round(i * n / shards) for i in range(shards + 1)]
    from tqdm import tqdm

    index: dict[str, Any] = {
        "format": S.FORMAT,
        "version": S.VERSION,
        "sample_rate": SAMPLE_RATE,
        "audio": audio,
        "manifest": str(spec),
        "shards": [],
        "num_samples": [],
        "sources": [],
        "texts": [] if manifest.texts is not None else None,
        "columns": {name: [] for name in columns},
        "skipped": [],
    }
    workers = num_threads or min(8, os.cpu_count() or 1)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp, concurrent.futures.ThreadPoolExecutor(workers) as pool:
        bar = tqdm(total=n, desc="d2v prepare", unit="clip", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        for s in range(shards):
            name = S.shard_name(s, shards)
            writer = ArrayRecordWriter(str(tmp / name), S.WRITER_OPTIONS)
            records = 0
            try:
                for lo in range(bounds[s], bounds[s + 1], CHUNK):
                    chunk = range(lo, min(lo + CHUNK, bounds[s + 1]))
                    for i, result in zip(chunk, pool.map(lambda i: _load(manifest, i), chunk), strict=True):
                        bar.update(1)
                        if isinstance(result, D2VError):
                            if strict:
                                bar.close()
                                raise D2VError(f"{result} (--strict: nothing written)")
                            bar.write(f"skipped: {result}", file=sys.stderr)
                            index["skipped"].append({"path": manifest.paths[i], "reason": str(result)})
                            continue
                        text = manifest.texts[i] if manifest.texts is not None else None
                        cols = {k: v[i] for k, v in columns.items()}
                        record, num = S.encode_record(result, audio, text, cols, manifest.paths[i])
                        writer.write(record)
                        records += 1
                        index["num_samples"].append(num)
                        index["sources"].append(manifest.paths[i])
                        if index["texts"] is not None:
                            index["texts"].append(text)
                        for k, v in cols.items():
                            index["columns"][k].append(v)
            finally:
                writer.close()
            index["shards"].append({"file": name, "records": records})
        if not index["num_samples"]:
            raise D2VError(f"{spec}: no clip could be read; nothing written")
        (tmp / S.INDEX_NAME).write_text(json.dumps(index, ensure_ascii=False) + "\n", encoding="utf-8")
        bar.close()
    return {
        "clips": len(index["num_samples"]),
        "skipped": len(index["skipped"]),
        "shards": shards,
        "seconds": round(sum(index["num_samples"]) / SAMPLE_RATE, 2),
        "bytes": sum(p.stat().st_size for p in Path(out_dir).iterdir()),
    }


def _load(manifest: Manifest, i: int) -> np.ndarray | D2VError:
    try:
        return manifest.load(i)
    except D2VError as e:
        return e


def extra_columns(spec: str | os.PathLike) -> dict[str, list[str]]:
    """A TSV manifest's columns other than path, text and num_samples (labels, speakers), by name."""
    path = Path(os.fspath(spec))
    if not path.is_file():
        return {}
    lines = read_lines(path)
    header = lines[0].split("\t") if lines else []
    if "path" not in header:  # a fairseq manifest
        return {}
    keep = [(j, name) for j, name in enumerate(header) if name not in ("path", "text", "num_samples")]
    out: dict[str, list[str]] = {name: [] for _, name in keep}
    for _, fields in tsv_rows(path, lines):
        for j, name in keep:
            out[name].append(fields[j].strip())
    return out
