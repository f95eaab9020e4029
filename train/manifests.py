"""Manifests: the list of clips a run trains on, read from a TSV, a fairseq manifest or tfds.

    from flax_d2v.train.manifests import read_manifest
    m = read_manifest("train.tsv", require_text=True)   # or fairseq NAME.tsv, or "tfds:librispeech/dev_clean"
    m.paths, m.texts, m.lengths()                        # lengths at 16 kHz, read from headers if not given
    m.load(i)                                            # clip i as float32 mono 16 kHz

Formats (`read_manifest(spec)`):
- TSV with a header line: column `path` (absolute, or relative to the manifest's directory),
  optional `text` (the transcript; needed for fine-tuning, not for pretraining) and optional
  `num_samples` (exact length at 16 kHz; without it the length is read from each file's header
  once at start-up). Other columns are ignored, so `../shared/speech/transcripts.tsv` is a
  manifest. Fields are split on tabs only (no quoting).
- fairseq: `NAME.tsv` whose first line is the root directory (absolute, or relative to the
  manifest), then `relative/path<TAB>num_samples` per clip; transcripts, if any, from `NAME.ltr`
  (letters separated by spaces, `|` between words) or else `NAME.wrd` (words), one line per clip.
- a directory written by `d2v prepare` (`shards.py`): ArrayRecord shards of the clips, already
  at 16 kHz, with an `index.json` of their lengths, transcripts and other columns.
- `tfds:NAME/SPLIT` (e.g. `tfds:librispeech/train_clean100`): `tfds.data_source(NAME, split=SPLIT)`
  with fields `speech` (int16 PCM) and `text`. The dataset must already be prepared in the
  ArrayRecord format (nothing is downloaded); lengths are found by reading every record once,
  which `length_cache=` keeps in a JSON file for the next start.
- a Hugging Face `datasets` split: `hf:NAME[:CONFIG]:SPLIT`, a `save_to_disk` directory, or
  parquet files (`data/train-*.parquet`), with `audio_column`/`text_column` (`hf_datasets.py`).

An example is `{"path": str, "text": str | None, "index": int}`; `index` is its position in the
manifest, the same on every host, so per-example randomness can be `fold_in(key, index)`.
Which examples a run keeps and how they are batched is `planning.py`; loading and padding them,
`loader.py`.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flax_d2v import paths as loc  # "paths" is the manifest's list of clips here
from flax_d2v.audio import SAMPLE_RATE, load_audio, prepare_audio
from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_write_text
from flax_d2v.train import hf_datasets, shards

MAX_AUDIO_NOTES = 5  # resample/downmix notes printed before the rest are summarised.


class Manifest:
    """A list of clips: paths, optional transcripts, lengths at 16 kHz (-1 = not yet known).

    `load(i)` returns clip i as float32 mono 16 kHz through `flax_d2v.audio`, or through
    `reader(i)` for a source that is not files (tfds, ArrayRecord shards, a Hugging Face dataset).
    The manifest travels to the loader's worker processes by pickle, so a `reader` must pickle:
    an object that opens its source lazily, in each process, on first use, and leaves the open
    handle out of its pickled state (`TfdsReader`, `shards.ShardReader`).
    """

    def __init__(
        self,
        source: str,
        paths: list[str],
        texts: list[str] | None,
        num_samples: Sequence[int] | None = None,
        reader: Callable[[int], np.ndarray] | None = None,
    ):
        self.source = source
        self.paths = paths
        self.texts = texts
        unknown = np.full(len(paths), -1, np.int64)
        self.num_samples = unknown if num_samples is None else np.asarray(num_samples, np.int64)
        self._reader = reader
        self._notes = _NoteLimiter()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"path": self.paths[i], "text": None if self.texts is None else self.texts[i], "index": int(i)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def load(self, i: int) -> np.ndarray:
        if self._reader is not None:
            return self._reader(i)
        return load_audio(self.paths[i], SAMPLE_RATE, warn=self._notes)

    def lengths(self, num_workers: int = 8) -> np.ndarray:
        """Lengths at 16 kHz; those the manifest does not give are read once from the file headers."""
        missing = np.flatnonzero(self.num_samples < 0)
        if missing.size:
            with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
                self.num_samples[missing] = list(pool.map(_header_num_samples, [self.paths[i] for i in missing]))
        return self.num_samples


class _NoteLimiter:
    """A `warn` for load_audio: the first few notes are printed, later ones only counted."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # a lock does not pickle: each process gets its own
        return {"count": self.count}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.count, self._lock = state["count"], threading.Lock()

    def __call__(self, message: str) -> None:
        with self._lock:
            self.count += 1
            if self.count <= MAX_AUDIO_NOTES:
                print(message, file=sys.stderr, flush=True)
            elif self.count == MAX_AUDIO_NOTES + 1:
                print("note: further resampling/downmixing notes are not shown", file=sys.stderr, flush=True)


def _header_num_samples(path: str) -> int:
    """Length after loading at 16 kHz, from the header: an upper bound of soxr's output length.

    An object URL is opened as a file object, so soundfile reads its header, not the whole clip
    (a `num_samples` column saves even that)."""
    import soundfile as sf

    if loc.is_url(path):
        with loc.reporting(path), loc.as_path(path).open("rb") as f:
            try:
                info = sf.info(f)
            except (RuntimeError, OSError, ValueError) as e:
                raise D2VError(f"{path}: not an audio file that soundfile can read ({e})") from None
        return int(math.ceil(info.frames * SAMPLE_RATE / info.samplerate))
    try:
        info = sf.info(path)
    except Exception as e:  # noqa: BLE001 - soundfile raises several types for unreadable files
        if not os.path.exists(path):
            raise D2VError(f"{path}: no such file") from None
        raise D2VError(f"{path}: not an audio file that soundfile can read ({e})") from None
    return int(math.ceil(info.frames * SAMPLE_RATE / info.samplerate))


def read_manifest(
    spec: str | os.PathLike,
    *,
    require_text: bool = False,
    labels: str = "auto",
    data_dir: str | None = None,
    length_cache: str | os.PathLike | None = None,
    audio_column: str = "audio",
    text_column: str | None = None,
) -> Manifest:
    """Read a TSV manifest, a fairseq manifest (+ .ltr/.wrd), a `d2v prepare` directory, `tfds:NAME/SPLIT`,
    or a `datasets` split.

    `labels` picks the fairseq transcript file: "auto" (.ltr, else .wrd, else none), "ltr",
    "wrd" or "none". `require_text` (fine-tuning) fails when the manifest has no transcripts.
    `audio_column` and `text_column` name the columns of a `datasets` split (`hf_datasets.py`).
    """
    spec = os.fspath(spec)
    if hf_datasets.is_dataset_spec(spec):
        hf = hf_datasets.open_source(
            spec, audio_column=audio_column, text_column=text_column, require_text=require_text
        )
        lengths, texts = _cached_scan(hf.cache_key, hf.size, hf.scan, length_cache or hf.default_cache)
        m = Manifest(spec, hf.paths(), texts, lengths, reader=hf.reader)
    elif spec.startswith("tfds:"):
        m = read_tfds(spec, data_dir=data_dir, length_cache=length_cache)
    elif shards.is_shard_dir(spec):
        names, texts, lengths, reader = shards.open_shards(spec)
        m = Manifest(spec, names, texts, lengths, reader=reader)
    else:
        path = loc.as_path(spec)
        with loc.reporting(spec):
            found = path.is_file()
        if not found:
            if loc.is_url(spec):  # the bucket, the credentials or the object: say which
                with loc.reporting(spec):
                    path.read_bytes()
            raise D2VError(f"{spec}: no such manifest file")
        first = read_lines(path)[:1]
        if first and "\t" not in first[0] and first[0].strip() != "path":
            m = read_fairseq_manifest(path, labels=labels)
        else:
            m = read_tsv_manifest(path)
    if require_text and m.texts is None:
        raise D2VError(
            f"{spec}: no transcripts (a 'text' column, or a .ltr/.wrd file beside a fairseq manifest); "
            "fine-tuning needs them"
        )
    return m


def read_lines(path: loc.AnyPath) -> list[str]:
    """A UTF-8 text file's (or object's) lines (BOM and CR removed); unreadable or non-UTF-8 files fail in one line."""
    try:
        with loc.reporting(path):
            text = loc.as_path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise D2VError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise D2VError(f"{path}: cannot read ({e.strerror or e})") from None
    return [line.rstrip("\r") for line in text.split("\n")]


def _resolve(base: loc.AnyPath, p: str) -> str:
    """`p` relative to the manifest's directory `base` (a URL in a bucket, or local)."""
    return loc.resolve(base, p)


def read_tsv_manifest(path: str | os.PathLike) -> Manifest:
    """A TSV with a header: `path`, optional `text`, optional `num_samples`; other columns ignored."""
    path = loc.as_path(path)
    lines = read_lines(path)
    if not lines or not lines[0].strip():
        raise D2VError(f"{path}: empty manifest (expected a header line with a 'path' column)")
    header = lines[0].split("\t")
    if "path" not in header:
        raise D2VError(f"{path}: no 'path' column in the header (found: {', '.join(header)})")
    col = {name: header.index(name) for name in ("path", "text", "num_samples") if name in header}
    paths: list[str] = []
    texts: list[str] | None = [] if "text" in col else None
    lengths: list[int] | None = [] if "num_samples" in col else None
    for lineno, fields in tsv_rows(path, lines):
        if not fields[col["path"]].strip():
            raise D2VError(f"{path}:{lineno}: column 'path' is empty")
        paths.append(_resolve(path.parent, fields[col["path"]].strip()))
        if texts is not None:
            texts.append(fields[col["text"]])
        if lengths is not None:
            lengths.append(_parse_count(fields[col["num_samples"]], f"{path}:{lineno}: column 'num_samples'"))
    if not paths:
        raise D2VError(f"{path}: manifest lists no clips")
    return Manifest(str(path), paths, texts, lengths)


def tsv_rows(path: Path, lines: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line after the header `lines[0]`; fields are split on
    tabs only, and a line with another number of columns than the header fails in one line."""
    width = len(lines[0].split("\t"))
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != width:
            raise D2VError(f"{path}:{lineno}: expected {width} tab-separated columns, found {len(fields)}")
        yield lineno, fields


def _parse_count(value: str, where: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise D2VError(f"{where}: not an integer: {value!r}") from None
    if n < 0:
        raise D2VError(f"{where}: negative length {n}")
    return n


def read_fairseq_manifest(path: str | os.PathLike, labels: str = "auto") -> Manifest:
    """fairseq's `NAME.tsv` (root line, then `relpath<TAB>num_samples`) with `NAME.ltr` or `NAME.wrd`."""
    path = loc.as_path(path)
    lines = [line for line in read_lines(path) if line.strip()]
    if not lines:
        raise D2VError(f"{path}: empty manifest")
    root = _resolve(path.parent, lines[0].strip())
    paths, lengths = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2:
            raise D2VError(f"{path}:{lineno}: expected 'relative_path<TAB>num_samples', found {len(fields)} column(s)")
        paths.append(_resolve(root, fields[0].strip()))
        lengths.append(_parse_count(fields[1].strip(), f"{path}:{lineno}: num_samples"))
    if not paths:
        raise D2VError(f"{path}: manifest lists no clips")
    if labels not in ("auto", "ltr", "wrd", "none"):
        raise D2VError(f"labels: expected auto, ltr, wrd or none, got {labels!r}")
    texts = None
    candidates = {"auto": ["ltr", "wrd"], "none": []}.get(labels, [labels])
    for ext in candidates:
        label_path = path.with_suffix("." + ext)
        if not label_path.is_file():
            if labels != "auto":
                raise D2VError(f"{label_path}: no such label file")
            continue
        rows = read_lines(label_path)
        while rows and not rows[-1].strip():
            rows.pop()
        if len(rows) != len(paths):
            raise D2VError(f"{label_path}: {len(rows)} lines but {path} lists {len(paths)} clips")
        texts = [_ltr_to_text(r) if ext == "ltr" else " ".join(r.split()) for r in rows]
        break
    return Manifest(str(path), paths, texts, lengths)


def _ltr_to_text(line: str) -> str:
    """fairseq letters ("T E N | O F |") back to words ("TEN OF")."""
    return " ".join("".join(" " if t == "|" else t for t in line.split()).split())


def read_tfds(
    spec: str,
    data_dir: str | None = None,
    length_cache: str | os.PathLike | None = None,
    audio_key: str = "speech",
    text_key: str | None = "text",
) -> Manifest:
    """`tfds:NAME/SPLIT` through `tfds.data_source` (random access, ArrayRecord), never downloading."""
    body = spec[len("tfds:") :]
    name, _, split = body.rpartition("/")
    if not name or not split:
        raise D2VError(f"{spec}: expected tfds:NAME/SPLIT, e.g. tfds:librispeech/train_clean100")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise D2VError(f"{spec}: tensorflow-datasets is not installed (pip install 'flax-d2v[tf]')") from None
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - tfds raises many types (KeyError, AssertionError, DatasetNotFoundError...)
        raise D2VError(
            f"{spec}: cannot open the prepared dataset ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"prepare it where there is network access with `tfds build {name} --file_format=array_record` "
            "and point TFDS_DATA_DIR (or data_dir) at it"
        ) from None
    n = len(source)
    if n == 0:
        raise D2VError(f"{spec}: the split is empty")
    features = getattr(getattr(source, "dataset_info", None), "features", None)
    sample_rate = SAMPLE_RATE
    if features is not None and audio_key in features:
        sample_rate = int(getattr(features[audio_key], "sample_rate", None) or SAMPLE_RATE)
    first = source[0]
    if audio_key not in first:
        raise D2VError(f"{spec}: no field {audio_key!r} (fields: {', '.join(sorted(first))})")
    if text_key is not None and text_key not in first:
        text_key = None
    paths = [f"{spec}[{i}]" for i in range(n)]
    reader = TfdsReader(spec, name, split, data_dir, audio_key, sample_rate, source)

    def scan() -> tuple[np.ndarray, list[str] | None]:
        lengths = np.empty(n, np.int64)
        texts: list[str] | None = [] if text_key is not None else None
        for i in range(n):
            record = source[i]
            lengths[i] = math.ceil(len(record[audio_key]) * SAMPLE_RATE / sample_rate)
            if texts is not None:
                texts.append(_as_str(record[text_key]))
        return lengths, texts

    lengths, texts = _cached_scan(spec, n, scan, length_cache)
    return Manifest(spec, paths, texts, lengths, reader=reader)


class TfdsReader:
    """Record i's audio as float32 mono 16 kHz. Picklable: a worker process opens the
    `tfds.data_source` itself on first use (the open source is not sent along)."""

    def __init__(
        self,
        spec: str,
        name: str,
        split: str,
        data_dir: str | None,
        audio_key: str,
        sample_rate: int,
        source: Any = None,
    ) -> None:
        self.spec, self.name, self.split, self.data_dir = spec, name, split, data_dir
        self.audio_key, self.sample_rate, self._source = audio_key, sample_rate, source
        self._notes = _NoteLimiter()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}

    def __call__(self, i: int) -> np.ndarray:
        if self._source is None:
            import tensorflow_datasets as tfds

            self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)
        audio = np.asarray(self._source[i][self.audio_key])
        return prepare_audio(audio, self.sample_rate, name=f"{self.spec}[{i}]", warn=self._notes)


def _as_str(x: Any) -> str:
    x = x.item() if isinstance(x, np.ndarray) else x
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _cached_scan(
    spec: str, n: int, scan: Callable[[], tuple[np.ndarray, list[str] | None]], cache: str | os.PathLike | None
) -> tuple[np.ndarray, list[str] | None]:
    """Lengths and texts of every record, from `cache` if it matches (spec, size), else scanned and cached."""
    if cache is not None and loc.as_path(cache).is_file():
        try:
            with loc.reporting(cache):
                data = json.loads(loc.as_path(cache).read_bytes().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise D2VError(f"{cache}: unreadable length cache ({e}); delete it to rebuild") from None
        if data.get("spec") == spec and data.get("num_examples") == n:
            return np.asarray(data["num_samples"], np.int64), data.get("texts")
    lengths, texts = scan()
    if cache is not None:
        payload = {"spec": spec, "num_examples": n, "num_samples": lengths.tolist(), "texts": texts}
        atomic_write_text(cache, json.dumps(payload, ensure_ascii=False))
    return lengths, texts
