"""Training data: manifests, duration filters, length-bucketed batches, process sharding, prefetch.

    from flax_d2v.train import data, vocab as V
    m = data.read_manifest("train.tsv", require_text=True)      # or fairseq NAME.tsv, or "tfds:librispeech/dev_clean"
    voc = V.build_vocab(m.texts)
    loader = data.BatchLoader(m, batch_size=8, vocab=voc, seed=0, max_seconds=20,
                              process_index=jax.process_index(), process_count=jax.process_count())
    print(loader.summary())                                      # examples kept/dropped, buckets, unknown chars
    for batch in loader:                                         # endless (repeat=True); one epoch with repeat=False
        ...; ckpt["data"] = loader.state()                       # {"epoch": e, "batch_in_epoch": b}
    loader.restore(ckpt["data"])                                 # continues with the next unseen batch

Manifest formats (`read_manifest(spec)`):
- TSV with a header line: column `path` (absolute, or relative to the manifest's directory),
  optional `text` (the transcript; needed for fine-tuning, not for pretraining) and optional
  `num_samples` (exact length at 16 kHz; without it the length is read from each file's header
  once at start-up). Other columns are ignored, so `../shared/speech/transcripts.tsv` is a
  manifest. Fields are split on tabs only (no quoting).
- fairseq: `NAME.tsv` whose first line is the root directory (absolute, or relative to the
  manifest), then `relative/path<TAB>num_samples` per clip; transcripts, if any, from `NAME.ltr`
  (letters separated by spaces, `|` between words) or else `NAME.wrd` (words), one line per clip.
- `tfds:NAME/SPLIT` (e.g. `tfds:librispeech/train_clean100`): `tfds.data_source(NAME, split=SPLIT)`
  with fields `speech` (int16 PCM) and `text`. The dataset must already be prepared in the
  ArrayRecord format (nothing is downloaded); lengths are found by reading every record once,
  which `length_cache=` keeps in a JSON file for the next start.

An example is `{"path": str, "text": str | None, "index": int}`; `index` is its position in the
manifest, the same on every host, so per-example randomness can be `fold_in(key, index)`.

Batches (numpy, on each process only its rows `[p*B/P, (p+1)*B/P)` of the global batch B):
- `input_values` (b, S) float32: each clip normalised over its own samples like HF's
  `Wav2Vec2FeatureExtractor` (eps 1e-7), 0.0 in the padding; `attention_mask` (b, S) int32.
- `index` (b,) int64 manifest positions, -1 for filler rows (only in the last batch of a
  `drop_remainder=False` pass: all-zero mask, no labels; leave them out of metrics);
  `seconds` (b,) float32 real durations.
- with a vocabulary: `labels` (b, L) int32 padded with -100 (HF), `label_lengths` (b,) int32,
  `num_unknown` (b,) int32 characters mapped to `<unk>`.

Shapes: S is one of `loader.bucket_samples` (a geometric ladder, ratio `bucket_growth`, in
multiples of 0.1 s) and L is fixed per bucket, so XLA compiles one program per bucket. Each
epoch, examples are shuffled by (seed, epoch); with `drop_remainder` the last N mod B of that
order sit the epoch out (different ones each epoch); the rest are grouped by bucket and cut into
batches (a bucket's leftovers move up into the next bucket, so at most one partial batch, the
last, exists), and the batch order is shuffled. The plan depends only on the manifest and the
arguments, never on the process or on how far a previous run got, which makes `restore` exact.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flax_d2v.audio import HF_NORM_EPS, SAMPLE_RATE, load_audio, pad_batch, prepare_audio
from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_write_text
from flax_d2v.train import vocab as V

LABEL_PAD = -100  # HF's ignore index for padded label positions.
MIN_SAMPLES = 400  # receptive field of data2vec-audio's conv encoder: a shorter clip yields no frame.
BUCKET_MULTIPLE = 1600  # 0.1 s at 16 kHz, a multiple of the encoder's total stride (320).
LABEL_MULTIPLE = 8  # label pad lengths rounded up to this, so small transcript changes don't add shapes.
MAX_AUDIO_NOTES = 5  # resample/downmix notes printed before the rest are summarised.


# ------------------------------------------------------------------------------------------ manifests
class Manifest:
    """A list of clips: paths, optional transcripts, lengths at 16 kHz (-1 = not yet known).

    `load(i)` returns clip i as float32 mono 16 kHz through `flax_d2v.audio`.
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

    def __call__(self, message: str) -> None:
        with self._lock:
            self.count += 1
            if self.count <= MAX_AUDIO_NOTES:
                print(message, file=sys.stderr, flush=True)
            elif self.count == MAX_AUDIO_NOTES + 1:
                print("note: further resampling/downmixing notes are not shown", file=sys.stderr, flush=True)


def _header_num_samples(path: str) -> int:
    """Length after loading at 16 kHz, from the header: an upper bound of soxr's output length."""
    import soundfile as sf

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
) -> Manifest:
    """Read a TSV manifest, a fairseq manifest (+ .ltr/.wrd), or `tfds:NAME/SPLIT`.

    `labels` picks the fairseq transcript file: "auto" (.ltr, else .wrd, else none), "ltr",
    "wrd" or "none". `require_text` (fine-tuning) fails when the manifest has no transcripts.
    """
    spec = os.fspath(spec)
    if spec.startswith("tfds:"):
        m = read_tfds(spec, data_dir=data_dir, length_cache=length_cache)
    else:
        path = Path(spec)
        if not path.is_file():
            raise D2VError(f"{spec}: no such manifest file")
        first = _read_lines(path)[:1]
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


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise D2VError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise D2VError(f"{path}: cannot read ({e.strerror or e})") from None
    return [line.rstrip("\r") for line in text.split("\n")]


def _resolve(base: Path, p: str) -> str:
    return p if os.path.isabs(p) else os.path.normpath(base / p)


def read_tsv_manifest(path: str | os.PathLike) -> Manifest:
    """A TSV with a header: `path`, optional `text`, optional `num_samples`; other columns ignored."""
    path = Path(path)
    lines = _read_lines(path)
    if not lines or not lines[0].strip():
        raise D2VError(f"{path}: empty manifest (expected a header line with a 'path' column)")
    header = lines[0].split("\t")
    if "path" not in header:
        raise D2VError(f"{path}: no 'path' column in the header (found: {', '.join(header)})")
    col = {name: header.index(name) for name in ("path", "text", "num_samples") if name in header}
    paths: list[str] = []
    texts: list[str] | None = [] if "text" in col else None
    lengths: list[int] | None = [] if "num_samples" in col else None
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise D2VError(f"{path}:{lineno}: expected {len(header)} tab-separated columns, found {len(fields)}")
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
    path = Path(path)
    lines = [line for line in _read_lines(path) if line.strip()]
    if not lines:
        raise D2VError(f"{path}: empty manifest")
    root = Path(_resolve(path.parent, lines[0].strip()))
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
        rows = _read_lines(label_path)
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
    notes = _NoteLimiter()

    def reader(i: int) -> np.ndarray:
        return prepare_audio(np.asarray(source[i][audio_key]), sample_rate, name=paths[i], warn=notes)

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


def _as_str(x: Any) -> str:
    x = x.item() if isinstance(x, np.ndarray) else x
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _cached_scan(
    spec: str, n: int, scan: Callable[[], tuple[np.ndarray, list[str] | None]], cache: str | os.PathLike | None
) -> tuple[np.ndarray, list[str] | None]:
    """Lengths and texts of every record, from `cache` if it matches (spec, size), else scanned and cached."""
    if cache is not None and Path(cache).is_file():
        try:
            data = json.loads(Path(cache).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise D2VError(f"{cache}: unreadable length cache ({e}); delete it to rebuild") from None
        if data.get("spec") == spec and data.get("num_examples") == n:
            return np.asarray(data["num_samples"], np.int64), data.get("texts")
    lengths, texts = scan()
    if cache is not None:
        payload = {"spec": spec, "num_examples": n, "num_samples": lengths.tolist(), "texts": texts}
        atomic_write_text(cache, json.dumps(payload, ensure_ascii=False))
    return lengths, texts


# ------------------------------------------------------------------------------------------ selection
def select_examples(
    manifest: Manifest, min_seconds: float | None = None, max_seconds: float | None = None, require_text: bool = False
) -> tuple[np.ndarray, dict[str, int]]:
    """Manifest positions kept by the duration filters, and how many each filter dropped.

    Clips shorter than `MIN_SAMPLES` are always dropped (as `too_short`): the encoder gives them
    no frame. With `require_text`, clips with an empty transcript are dropped as `no_text`.
    """
    n = manifest.lengths()
    lo = max(MIN_SAMPLES, 0 if min_seconds is None else math.ceil(min_seconds * SAMPLE_RATE))
    too_short = n < lo
    too_long = n > max_seconds * SAMPLE_RATE if max_seconds is not None else np.zeros(len(n), bool)
    no_text = np.zeros(len(n), bool)
    if require_text:
        if manifest.texts is None:
            raise D2VError(f"{manifest.source}: no transcripts; fine-tuning needs them")
        no_text = np.array([not V.normalize_transcript(t or "") for t in manifest.texts], bool)
    keep = ~(too_short | too_long | no_text)
    dropped = {
        "too_short": int(too_short.sum()),
        "too_long": int((too_long & ~too_short).sum()),
        "no_text": int((no_text & ~too_short & ~too_long).sum()),
    }
    return np.flatnonzero(keep).astype(np.int64), dropped


def bucket_ladder(
    min_samples: int, max_samples: int, growth: float = 1.25, multiple: int = BUCKET_MULTIPLE
) -> np.ndarray:
    """Padded lengths from `min_samples` up to at least `max_samples`, each ~`growth` times the last.

    At most a fraction (growth-1)/growth of a batch is padding; ~log(max/min)/log(growth) shapes.
    """
    if growth <= 1.0:
        raise D2VError(f"bucket_growth: must be > 1, got {growth}")
    up = lambda x: int(math.ceil(x / multiple) * multiple)
    ladder = [up(max(min_samples, 1))]
    while ladder[-1] < max_samples:
        ladder.append(max(up(ladder[-1] * growth), ladder[-1] + multiple))
    return np.asarray(ladder, np.int64)


def plan_epoch(
    buckets: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool = True, drop_remainder: bool = True
) -> list[tuple[int, np.ndarray]]:
    """The epoch's batches as (bucket, rows) where rows indexes `buckets` (the kept examples).

    `buckets[j]` is kept example j's bucket. With `drop_remainder`, len % batch_size examples
    (random ones when shuffling) sit the epoch out; otherwise the last batch is topped up with
    filler rows (-1). A pure function of its arguments, so every process and every restart
    computes the same plan.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(buckets)) if shuffle else np.arange(len(buckets))
    if drop_remainder and len(order) % batch_size:
        # Drop the remainder up front, at random when shuffling: dropping the last bucket's leftovers
        # instead would leave out the same longest clips every epoch.
        order = order[: len(order) - len(order) % batch_size]
    order = order[np.argsort(buckets[order], kind="stable")]
    batches: list[tuple[int, np.ndarray]] = []
    carry = np.zeros(0, np.int64)
    for b in np.unique(buckets):
        items = np.concatenate([carry, order[buckets[order] == b]])
        full = len(items) // batch_size * batch_size
        batches += [(int(b), items[s : s + batch_size]) for s in range(0, full, batch_size)]
        carry = items[full:]
    if carry.size and not drop_remainder:
        rows = np.full(batch_size, -1, np.int64)
        rows[: carry.size] = carry
        batches.append((int(buckets[carry].max()), rows))
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# ------------------------------------------------------------------------------------------ batches
class BatchLoader:
    """Length-bucketed, shuffled, process-sharded, prefetched batches with a resumable position.

    Iterating yields this process's rows of each global batch (see the module docstring for the
    keys). `state()` is the position after the last batch handed out; `restore(state)` resumes
    there. `repeat=False` stops after one epoch (evaluation: `shuffle=False, drop_remainder=False`).
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        batch_size: int,
        vocab: Mapping[str, int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        drop_remainder: bool = True,
        min_seconds: float | None = None,
        max_seconds: float | None = None,
        require_text: bool | None = None,
        bucket_samples: Sequence[int] | None = None,
        bucket_growth: float = 1.25,
        normalize: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 2,
        num_workers: int = 4,
    ):
        if batch_size < 1 or batch_size % process_count:
            raise D2VError(f"batch_size: {batch_size} must be a positive multiple of the process count {process_count}")
        if not 0 <= process_index < process_count:
            raise D2VError(f"process_index: {process_index} is not in [0, {process_count})")
        self.manifest, self.batch_size, self.seed = manifest, batch_size, seed
        self.shuffle, self.repeat, self.drop_remainder, self.normalize = shuffle, repeat, drop_remainder, normalize
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        self.prefetch, self.num_workers = prefetch, max(1, num_workers)
        self.vocab = None if vocab is None else V.validate_vocab(vocab)
        require_text = self.vocab is not None if require_text is None else require_text
        self.positions, self.dropped = select_examples(manifest, min_seconds, max_seconds, require_text)
        if self.positions.size == 0:
            raise D2VError(f"{manifest.source}: no clips left after the filters (dropped: {self.dropped})")
        lengths = manifest.num_samples[self.positions]
        if bucket_samples is None:
            self.bucket_samples = bucket_ladder(int(lengths.min()), int(lengths.max()), bucket_growth)
        else:
            self.bucket_samples = np.asarray(sorted(int(b) for b in bucket_samples), np.int64)
            if lengths.max() > self.bucket_samples[-1]:
                raise D2VError(
                    f"bucket_samples: the longest kept clip has {lengths.max()} samples, more than the "
                    f"largest bucket {self.bucket_samples[-1]} (lower max_seconds or add a bucket)"
                )
        self._bucket_of = np.searchsorted(self.bucket_samples, lengths, side="left").astype(np.int64)
        self._labels: list[np.ndarray] = []
        self._unknown = np.zeros(len(self.positions), np.int32)
        self.label_widths = np.zeros(len(self.bucket_samples), np.int64)
        if self.vocab is not None:
            for j, p in enumerate(self.positions):
                ids, self._unknown[j] = V.encode(manifest.texts[p] or "", self.vocab)
                self._labels.append(np.asarray(ids, np.int32))
            longest = np.zeros(len(self.bucket_samples), np.int64)
            np.maximum.at(longest, self._bucket_of, [len(x) for x in self._labels])
            # Leftovers only move up the ladder, so bucket k can hold labels as long as any bucket <= k.
            cum = np.maximum.accumulate(longest)
            self.label_widths = np.maximum(LABEL_MULTIPLE, -(-cum // LABEL_MULTIPLE) * LABEL_MULTIPLE)
        self.batches_per_epoch = len(plan_epoch(self._bucket_of, batch_size, seed, 0, shuffle, drop_remainder))
        if self.batches_per_epoch == 0:
            raise D2VError(
                f"batch_size: {batch_size} is larger than the {len(self.positions)} clips kept "
                f"from {manifest.source} (and drop_remainder is on)"
            )
        self._epoch, self._batch = 0, 0
        self._plan_cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._gen: Iterator[tuple[int, int, dict]] | None = None
        self._stop = threading.Event()

    # -- position
    def state(self) -> dict[str, int]:
        """The position after the last batch handed out, to be saved with a checkpoint."""
        return {"epoch": self._epoch, "batch_in_epoch": self._batch}

    def restore(self, state: Mapping[str, int]) -> None:
        """Continue at `state` (from `state()`); prefetched batches are discarded."""
        try:
            epoch, b = int(state["epoch"]), int(state["batch_in_epoch"])
        except (KeyError, TypeError, ValueError):
            raise D2VError(f"data state: expected {{'epoch': int, 'batch_in_epoch': int}}, got {state!r}") from None
        if epoch < 0 or not 0 <= b <= self.batches_per_epoch:
            raise D2VError(
                f"data state: {state!r} is outside this data (an epoch has {self.batches_per_epoch} batches)"
            )
        self.close()
        self._epoch, self._batch = epoch, b
        if self._batch == self.batches_per_epoch and self.repeat:
            self._epoch, self._batch = epoch + 1, 0

    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """Epoch `epoch`'s global batches as (bucket, manifest positions; -1 for filler rows)."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            rows = plan_epoch(self._bucket_of, self.batch_size, self.seed, epoch, self.shuffle, self.drop_remainder)
            self._plan_cache = (epoch, [(k, np.where(r >= 0, self.positions[np.maximum(r, 0)], -1)) for k, r in rows])
        return self._plan_cache[1]

    # -- assembly
    def local_rows(self, positions: np.ndarray) -> np.ndarray:
        """This process's slice of a global batch."""
        s = self.process_index * self.local_batch_size
        return positions[s : s + self.local_batch_size]

    def make_batch(self, bucket: int, positions: np.ndarray, pool: concurrent.futures.Executor | None = None) -> dict:
        """Load and pad this process's rows of the global batch `positions` (bucket `bucket`)."""
        rows = self.local_rows(positions)
        real = [int(p) for p in rows if p >= 0]
        waves = list(pool.map(self.manifest.load, real)) if pool is not None else [self.manifest.load(p) for p in real]
        width = int(self.bucket_samples[bucket])
        for p, w in zip(real, waves, strict=True):
            if len(w) > width:
                raise D2VError(
                    f"{self.manifest.paths[p]}: decoded to {len(w)} samples, more than the "
                    f"{self.manifest.num_samples[p]} its manifest entry declares"
                )
        b = len(rows)
        if waves:
            values, mask = pad_batch(waves, do_normalize=self.normalize, pad_to=width, batch_to=b, eps=HF_NORM_EPS)
        else:
            values, mask = np.zeros((b, width), np.float32), np.zeros((b, width), np.int32)
        seconds = np.zeros(b, np.float32)
        seconds[: len(waves)] = [len(w) / SAMPLE_RATE for w in waves]
        # Filler rows (-1) only ever trail a batch, so row r of the arrays is rows[r].
        batch = {
            "input_values": values,
            "attention_mask": mask,
            "index": np.asarray(rows, np.int64),
            "seconds": seconds,
        }
        if self.vocab is not None:
            labels = np.full((b, int(self.label_widths[bucket])), LABEL_PAD, np.int32)
            lengths, unknown = np.zeros(b, np.int32), np.zeros(b, np.int32)
            slot = np.searchsorted(self.positions, real)  # positions are sorted: manifest position -> kept row
            for r, j in enumerate(slot):
                labels[r, : len(self._labels[j])] = self._labels[j]
                lengths[r], unknown[r] = len(self._labels[j]), self._unknown[j]
            batch.update(labels=labels, label_lengths=lengths, num_unknown=unknown)
        return batch

    # -- iteration
    def _jobs(self, epoch: int, start: int) -> Iterator[tuple[int, int, int, np.ndarray]]:
        """(epoch, batch number, bucket, positions) in plan order from (epoch, start) on."""
        while True:
            for b, (bucket, positions) in enumerate(self.plan(epoch)[start:], start=start):
                yield epoch, b, bucket, positions
            if not self.repeat:
                return
            epoch, start = epoch + 1, 0

    def _produce(self, epoch: int, start: int, stop: threading.Event) -> Iterator[tuple[int, int, dict]]:
        """Batches in plan order, assembled `num_workers` at a time.

        Why whole batches per worker: decoding inside one batch in parallel left the padding and
        normalisation on this one thread, and the loader stopped scaling at ~5,000 audio s/s
        whatever the worker count (an H100 at 45% MFU eats ~9,000). A worker now decodes, pads and
        normalises a whole batch (libsndfile and numpy release the GIL), `num_workers` batches are
        in flight, and they are handed out in order, so the position (`state()`) is unchanged.
        """
        window: collections.deque = collections.deque()
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            try:
                for e, b, bucket, positions in self._jobs(epoch, start):
                    if stop.is_set():
                        return
                    window.append((e, b, pool.submit(self.make_batch, bucket, positions)))
                    if len(window) > self.num_workers:
                        e0, b0, done = window.popleft()
                        yield e0, b0, done.result()
                while window and not stop.is_set():
                    e0, b0, done = window.popleft()
                    yield e0, b0, done.result()
            finally:
                for _, _, pending in window:
                    pending.cancel()

    @staticmethod
    def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _worker(self, epoch: int, start: int, q: queue.Queue, stop: threading.Event) -> None:
        """Producer thread: decodes ahead into `q`; ends with ("end", None) or ("end", exception)."""
        end: BaseException | None = None
        try:
            for item in self._produce(epoch, start, stop):
                self._put(q, item, stop)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread and re-raised there
            end = e
        self._put(q, ("end", end), stop)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict:
        if not self.repeat and self._batch >= self.batches_per_epoch:
            raise StopIteration
        if self.prefetch <= 0:  # synchronous: a plain generator, no thread
            if self._gen is None:
                self._stop = threading.Event()
                self._gen = self._produce(self._epoch, self._batch, self._stop)
            item = next(self._gen)
        else:
            if self._thread is None:
                self._stop = threading.Event()
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(
                    target=self._worker,
                    name="d2v-data-prefetch",
                    daemon=True,
                    args=(self._epoch, self._batch, self._queue, self._stop),
                )
                self._thread.start()
            item = self._queue.get()
            if item[0] == "end":
                self.close()
                if item[1] is not None:
                    raise item[1]
                raise StopIteration
        epoch, b, batch = item
        self._epoch, self._batch = epoch, b + 1
        if self._batch == self.batches_per_epoch and self.repeat:
            self._epoch, self._batch = epoch + 1, 0
        return batch

    def close(self) -> None:
        """Stop prefetching (idempotent); the next `next()` starts again from `state()`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._gen is not None:
            self._gen.close()
        self._thread, self._queue, self._gen = None, None, None

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def summary(self) -> dict[str, Any]:
        """Numbers for the log: clips kept and dropped, hours, buckets, unknown characters."""
        kept = self.manifest.num_samples[self.positions]
        return {
            "source": self.manifest.source,
            "examples": int(self.positions.size),
            "dropped": dict(self.dropped),
            "hours": round(float(kept.sum()) / SAMPLE_RATE / 3600, 4),
            "batches_per_epoch": self.batches_per_epoch,
            "bucket_seconds": [round(float(b) / SAMPLE_RATE, 2) for b in self.bucket_samples],
            "label_widths": [int(x) for x in self.label_widths] if self.vocab is not None else None,
            "unknown_chars": int(self._unknown.sum()),
            "examples_with_unknown": int((self._unknown > 0).sum()),
        }
