"""Hugging Face `datasets` as a data source: a random-access `datasets.Dataset` read as a manifest.

    read_manifest("hf:librispeech_asr:clean:train.100")       # from the hub (or its local cache)
    read_manifest("hf:/data/my_dataset:test")                  # a dataset repository checked out locally
    read_manifest("ls_train/")                                  # a directory of `Dataset.save_to_disk`
    read_manifest("data/train-*.parquet")                       # parquet files with an Audio column

Specs (`is_dataset_spec`): `hf:NAME[:CONFIG]:SPLIT` goes through `datasets.load_dataset` (offline,
or without the dataset in the datasets cache, that is one line saying so); a directory holding
`state.json` is `datasets.load_from_disk` (a `DatasetDict` directory names its splits as
subdirectories: `DIR/train`); a `.parquet` path or glob is `load_dataset("parquet", ...)`.

Columns: the audio column (`audio` by default) must be an `Audio` feature (or the same
`{bytes, path}` struct). The transcript column defaults to the first of `TEXT_COLUMNS` there is.
A missing column is one line naming the columns there are.

Decoding is ours, not `datasets`': the audio column is cast to `Audio(decode=False)` and each row's
bytes (or its file, for a row that holds only a path) go through `flax_d2v.audio` like a TSV's
files: any rate soundfile reads, resampled with soxr, channels averaged. `datasets` >= 4 would
decode through torchcodec and FFmpeg's libraries; we need neither. Lengths come from each row's
header (`soundfile.info` on the bytes, no decoding), read once and kept in a JSON length cache
(`manifests._cached_scan`, as for tfds) keyed by the dataset's fingerprint, so the next start does
not read them again. The same clips give the same lengths, waveforms and thus batches as a TSV.

`HFAudioReader` (the manifest's `reader`) is picklable and opens the dataset lazily, in the process
that reads: loader worker processes reopen the dataset's memory-mapped Arrow files themselves.
`datasets` is optional (the `[hf]` extra) and only imported inside functions.
"""

from __future__ import annotations

import glob
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flax_d2v.audio import SAMPLE_RATE, load_audio, prepare_audio
from flax_d2v.errors import D2VError
from flax_d2v.train import shards

TEXT_COLUMNS = ("text", "sentence", "transcription", "normalized_text")  # the default --text-column, in order
MAX_NOTES = 5  # resample/downmix notes printed per process before the rest are summarised
SCAN_BATCH = 256  # rows per Arrow batch when reading lengths and transcripts


def is_dataset_spec(spec: str) -> bool:
    """Whether `read_manifest` should read `spec` through `datasets` (see the module docstring)."""
    if spec.startswith("hf:"):
        return True
    path = Path(spec)
    if path.suffix == ".parquet" or (glob.has_magic(spec) and spec.endswith("parquet")):
        return True
    if path.is_dir():  # any directory but a `d2v prepare` one (its index.json): a directory is ours to explain
        return not (path / shards.INDEX_NAME).is_file()
    return not path.exists() and (path.parent / "dataset_dict.json").is_file()  # DIR/SPLIT, the split missing


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise D2VError("Hugging Face datasets is not installed (pip install 'flax-d2v[hf]')") from None
    return datasets


# ------------------------------------------------------------------------------------------ opening
@dataclass(frozen=True)
class Opener:
    """How to open the dataset a spec names: picklable, so a worker process can reopen it."""

    spec: str
    kind: str  # "hub", "disk" or "parquet"
    args: tuple[Any, ...]

    def open(self) -> Any:
        datasets = _import_datasets()
        if self.kind == "disk":
            return datasets.load_from_disk(self.args[0])
        if self.kind == "parquet":
            return datasets.load_dataset("parquet", data_files=list(self.args), split="train")
        name, config, split = self.args
        return datasets.load_dataset(name, config, split=split)


def opener_for(spec: str) -> Opener:
    """The `Opener` of a spec, with its mistakes (bad syntax, no files, no such split dir) in one line."""
    if spec.startswith("hf:"):
        parts = spec[len("hf:") :].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise D2VError(f"{spec}: expected hf:NAME[:CONFIG]:SPLIT, e.g. hf:librispeech_asr:clean:train.100")
        name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else tuple(parts)
        return Opener(spec, "hub", (name, config, split))
    path = Path(spec)
    if path.suffix == ".parquet" or glob.has_magic(spec):
        files = sorted(glob.glob(spec))
        if not files:
            raise D2VError(f"{spec}: no parquet files match")
        return Opener(spec, "parquet", tuple(os.path.abspath(f) for f in files))
    if (path / "dataset_dict.json").is_file():
        splits = _splits(path)
        raise D2VError(
            f"{spec}: a DatasetDict with splits {', '.join(splits)}; name one, e.g. {path / splits[0]}"
            if splits
            else f"{spec}: a DatasetDict without splits"
        )
    if not path.is_dir() and (path.parent / "dataset_dict.json").is_file():
        raise D2VError(f"{spec}: no split {path.name!r} in {path.parent} (splits: {', '.join(_splits(path.parent))})")
    if not (path / "state.json").is_file():
        raise D2VError(f"{spec}: a directory, but not one written by datasets' save_to_disk (no state.json)")
    return Opener(spec, "disk", (os.path.abspath(spec),))


def _splits(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())


def open_dataset(opener: Opener) -> Any:
    """The `datasets.Dataset`; failures (offline, unknown split, unreadable files) as one line."""
    datasets = _import_datasets()
    try:
        ds = opener.open()
    except Exception as e:  # noqa: BLE001 - datasets/hub raise many types (ConnectionError, ValueError, ...)
        reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        if opener.kind == "hub" and isinstance(e, ConnectionError):  # what datasets raises offline / unreachable
            raise D2VError(
                f"{opener.spec}: cannot load {opener.args[0]!r} from the Hugging Face hub: offline, or not in the "
                f"datasets cache ({reason}); download it where there is network access (the same "
                "datasets.load_dataset call fills the cache), or save_to_disk and pass that directory"
            ) from None
        raise D2VError(f"{opener.spec}: cannot open the dataset ({reason})") from None
    if not isinstance(ds, datasets.Dataset):
        raise D2VError(f"{opener.spec}: expected one split (a datasets.Dataset), got {type(ds).__name__}")
    return ds


def check_column(spec: str, ds: Any, column: str, flag: str) -> None:
    if column not in ds.column_names:
        raise D2VError(f"{spec}: no column {column!r} (columns: {', '.join(ds.column_names)}); choose one with {flag}")


def text_column_of(spec: str, ds: Any, text_column: str | None, require_text: bool) -> str | None:
    """The transcript column: `text_column` if given (it must exist), else the first of `TEXT_COLUMNS`."""
    if text_column:
        check_column(spec, ds, text_column, "--text-column")
        return text_column
    found = next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    if found is None and require_text:
        raise D2VError(
            f"{spec}: no transcript column (none of {', '.join(TEXT_COLUMNS)}; columns: "
            f"{', '.join(ds.column_names)}); name it with --text-column"
        )
    return found


def audio_view(spec: str, ds: Any, audio_column: str) -> Any:
    """`ds` with only the audio column, cast to `Audio(decode=False)`: rows are {bytes, path}."""
    datasets = _import_datasets()
    check_column(spec, ds, audio_column, "--audio-column")
    feature = ds.features[audio_column]
    if not isinstance(feature, datasets.Audio):
        if not (isinstance(feature, dict) and {"bytes", "path"} <= set(feature)):
            raise D2VError(
                f"{spec}: column {audio_column!r} is not an Audio column ({type(feature).__name__}); "
                "choose one with --audio-column"
            )
        return ds.select_columns([audio_column])
    return ds.select_columns([audio_column]).cast_column(audio_column, datasets.Audio(decode=False))


# ------------------------------------------------------------------------------------------ reading
def _name(spec: str, i: int) -> str:
    return f"{spec}[{i}]"


def _resolve_path(base: str | None, path: str) -> str:
    return path if os.path.isabs(path) or base is None else os.path.join(base, path)


def decode_row(row: dict[str, Any] | None, name: str, base: str | None, warn: Callable[[str], None]) -> np.ndarray:
    """One `{bytes, path}` audio value as float32 mono 16 kHz, through `flax_d2v.audio`."""
    import io

    import soundfile as sf

    data = (row or {}).get("bytes")
    path = (row or {}).get("path")
    if data is None:
        if not path:
            raise D2VError(f"{name}: no audio (neither bytes nor a path)")
        return load_audio(_resolve_path(base, path), SAMPLE_RATE, warn=warn)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, declared = f.samplerate, f.frames
            x = f.read(dtype="float32")
    except Exception as e:  # noqa: BLE001 - soundfile raises several types for undecodable bytes
        raise D2VError(f"{name}: not audio that soundfile can decode ({str(e).strip() or type(e).__name__})") from None
    if 0 < declared < 2**62 and x.shape[0] < declared:
        raise D2VError(f"{name}: truncated (header declares {declared} frames, only {x.shape[0]} could be read)")
    return prepare_audio(x, rate, name=name, warn=warn)


def header_num_samples(data: Any, path: str | None, name: str, base: str | None) -> int:
    """Length at 16 kHz from the header alone (as `manifests._header_num_samples` for files)."""
    import pyarrow as pa
    import soundfile as sf

    try:
        if data is not None:
            info = sf.info(pa.BufferReader(data))
        elif path:
            full = _resolve_path(base, path)
            if not os.path.exists(full):
                raise D2VError(f"{name}: audio file {full}: no such file")
            info = sf.info(full)
        else:
            raise D2VError(f"{name}: no audio (neither bytes nor a path)")
    except D2VError:
        raise
    except Exception as e:  # noqa: BLE001 - soundfile raises several types for unreadable headers
        raise D2VError(f"{name}: not audio that soundfile can read ({str(e).strip() or type(e).__name__})") from None
    return int(math.ceil(info.frames * SAMPLE_RATE / info.samplerate))


class _Notes:
    """The resample/downmix notes of one process: the first `MAX_NOTES` printed, then one summary line."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, message: str) -> None:
        self.count += 1
        if self.count <= MAX_NOTES:
            print(message, file=sys.stderr, flush=True)
        elif self.count == MAX_NOTES + 1:
            print("note: further resampling/downmixing notes are not shown", file=sys.stderr, flush=True)


class HFAudioReader:
    """`reader(i)`: row i's audio as float32 mono 16 kHz. Picklable; opens the dataset on first use.

    In the process that built it, it reuses the dataset already open. Unpickled (a loader worker
    process), it reopens the dataset's memory-mapped Arrow files (`arrow_files`: no hub access, no
    parquet conversion) or, for a dataset without them, through its `Opener`.
    """

    def __init__(
        self, opener: Opener, audio_column: str, base: str | None, arrow_files: list[str] | None, view: Any = None
    ) -> None:
        self.opener, self.audio_column, self.base, self.arrow_files = opener, audio_column, base, arrow_files
        self._view = view  # `audio_view` of the open dataset, or None: opened on first use
        self._notes = _Notes()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_view", "_notes")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._view, self._notes = None, _Notes()

    def _dataset(self) -> Any:
        if self._view is None:
            if self.arrow_files:
                datasets = _import_datasets()
                parts = [datasets.Dataset.from_file(f) for f in self.arrow_files]
                ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
            else:
                ds = open_dataset(self.opener)
            self._view = audio_view(self.opener.spec, ds, self.audio_column)
        return self._view

    def __call__(self, i: int) -> np.ndarray:
        name = _name(self.opener.spec, i)
        return decode_row(self._dataset()[int(i)][self.audio_column], name, self.base, self._notes)


@dataclass
class HFSource:
    """An opened dataset split: what `read_manifest` turns into a `Manifest` (paths, scan, reader)."""

    spec: str
    size: int
    cache_key: str  # the length cache's `spec`: the dataset's fingerprint and columns included
    scan: Callable[[], tuple[np.ndarray, list[str] | None]]
    reader: HFAudioReader
    default_cache: Path | None

    def paths(self) -> list[str]:
        return [_name(self.spec, i) for i in range(self.size)]


def open_source(
    spec: str, *, audio_column: str = "audio", text_column: str | None = None, require_text: bool = False
) -> HFSource:
    """Open `spec`, check its columns, and set up the length/transcript scan and the reader."""
    opener = opener_for(spec)
    ds = open_dataset(opener)
    if len(ds) == 0:
        raise D2VError(f"{spec}: the split is empty")
    view = audio_view(spec, ds, audio_column)
    text = text_column_of(spec, ds, text_column, require_text)
    base = _base_dir(opener)
    columns = [audio_column] + ([text] if text else [])

    def scan() -> tuple[np.ndarray, list[str] | None]:
        table = ds.select_columns(columns).with_format("arrow")  # the stored {bytes, path}: nothing decoded
        lengths = np.empty(len(ds), np.int64)
        texts: list[str] | None = [] if text else None
        i = 0
        for batch in table.iter(batch_size=SCAN_BATCH):
            audio = batch.column(audio_column).combine_chunks()
            data, paths = audio.field("bytes"), audio.field("path")
            for j in range(len(audio)):
                value = data[j]
                lengths[i] = header_num_samples(
                    value.as_buffer() if value.is_valid else None, paths[j].as_py(), _name(spec, i), base
                )
                i += 1
            if texts is not None:
                texts.extend("" if t is None else str(t) for t in batch.column(text).to_pylist())
        return lengths, texts

    files = [f["filename"] for f in ds.cache_files]
    arrow_files = files if files and getattr(ds, "_indices", None) is None else None
    key = f"{spec}#{ds._fingerprint}#{audio_column}#{text or ''}"
    reader = HFAudioReader(opener, audio_column, base, arrow_files, view)
    return HFSource(spec, len(ds), key, scan, reader, _cache_path(key))


def _base_dir(opener: Opener) -> str | None:
    """Where a row's relative audio path is resolved: the saved directory or the parquet files' directory."""
    if opener.kind == "disk":
        return opener.args[0]
    if opener.kind == "parquet":
        return os.path.dirname(opener.args[0])
    return None


def _cache_path(key: str) -> Path | None:
    """The default length cache: a JSON file in the datasets cache, named by a hash of `key`; None if unwritable."""
    import hashlib

    datasets = _import_datasets()
    where = Path(datasets.config.HF_DATASETS_CACHE) / "flax_d2v_lengths"
    try:
        where.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(where, os.W_OK):
        return None
    return where / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def read_labels(spec: str, column: str) -> list[str]:
    """A classification label column, one name per row (a `ClassLabel`'s names, else the values as text)."""
    datasets = _import_datasets()
    ds = open_dataset(opener_for(spec))
    check_column(spec, ds, column, "--label-column")
    feature = ds.features[column]
    values = ds.select_columns([column]).with_format("arrow")[column].to_pylist()
    out = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise D2VError(f"{_name(spec, i)}: column {column!r} is empty")
        out.append(feature.int2str(int(v)) if isinstance(feature, datasets.ClassLabel) else str(v).strip())
    return out
