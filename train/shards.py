"""ArrayRecord shards of a manifest's clips (`d2v prepare`): the record format, the index, the reader.

    OUT_DIR/index.json                                  # what `read_manifest(OUT_DIR)` reads first
    OUT_DIR/clips-00000-of-00004.array_record ...       # one record per clip, in manifest order

Why: a pod does not want to open 281k small files in a bucket for every epoch, nor decode and
resample each one again. A shard holds each clip already at 16 kHz, as 16-bit PCM (`pcm16`: read
back with no decoding at all) or FLAC (`flac`: about half the bytes, a cheap decode), with its
transcript, its other manifest columns and its length; the index holds the lengths, transcripts
and columns of every clip too, so opening the shards reads one JSON file, not the records.

A record is `MAGIC`, a little-endian uint32 header length, a UTF-8 JSON header
(`{"num_samples", "audio", "text", "columns", "source"}`), then the audio bytes. Nothing is
unpickled. 16-bit PCM is how most speech corpora are stored: a 16 kHz 16-bit source reads back
bit for bit as its file does (`load_audio`'s float32 is the int16 value / 32768); a resampled
clip is rounded to 16 bits (clipped to [-1, 1)).

Records are read by `ShardReader` (a `Manifest` reader), in any process: it opens the shards with
`array_record`'s `ArrayRecordDataSource` on first use, in the process that reads (the loader's
workers each open their own).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource

from flax_d2v.audio import SAMPLE_RATE
from flax_d2v.errors import D2VError
from flax_d2v.fileio import read_json_object

INDEX_NAME = "index.json"
FORMAT = "flax-d2v-shards"
VERSION = 1
MAGIC = b"D2VA"
AUDIO_FORMATS = ("pcm16", "flac")
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: random access reads one clip; audio
# does not shrink under the container's generic compression enough to pay for decompressing it.
PCM_SCALE = 32768.0  # int16 <-> float32 as libsndfile converts 16-bit PCM


def shard_name(i: int, count: int) -> str:
    return f"clips-{i:05d}-of-{count:05d}.array_record"


# ------------------------------------------------------------------------------------- records
def to_pcm16(wave: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(wave, np.float64) * PCM_SCALE), -32768, 32767).astype("<i2")


def encode_record(
    wave: np.ndarray, audio: str, text: str | None, columns: dict[str, str], source: str
) -> tuple[bytes, int]:
    """(record bytes, number of samples) of a float32 16 kHz mono clip."""
    pcm = to_pcm16(wave)
    if audio == "pcm16":
        payload = pcm.tobytes()
    elif audio == "flac":
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        payload = buf.getvalue()
    else:
        raise D2VError(f"--format: expected one of {', '.join(AUDIO_FORMATS)}, got {audio!r}")
    header = {"num_samples": int(pcm.size), "audio": audio, "text": text, "columns": columns, "source": source}
    head = json.dumps(header, ensure_ascii=False).encode("utf-8")
    return MAGIC + struct.pack("<I", len(head)) + head + payload, int(pcm.size)


def decode_record(record: bytes, name: str) -> tuple[dict[str, Any], np.ndarray]:
    """(header, float32 16 kHz waveform) of a record; a malformed record fails in one line naming it."""
    if record[:4] != MAGIC or len(record) < 8:
        raise D2VError(f"{name}: not a flax-d2v shard record")
    (n,) = struct.unpack("<I", record[4:8])
    try:
        header = json.loads(record[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise D2VError(f"{name}: unreadable record header ({e})") from None
    payload = record[8 + n :]
    if header.get("audio") == "pcm16":
        pcm = np.frombuffer(payload, "<i2")
    elif header.get("audio") == "flac":
        import soundfile as sf

        try:
            pcm, _ = sf.read(io.BytesIO(payload), dtype="int16")
        except Exception as e:  # noqa: BLE001 - libsndfile's errors for broken FLAC
            raise D2VError(f"{name}: broken FLAC in the record ({e})") from None
    else:
        raise D2VError(f"{name}: unknown audio format {header.get('audio')!r}")
    if pcm.size != header.get("num_samples"):
        raise D2VError(f"{name}: {pcm.size} samples, the record's header says {header.get('num_samples')}")
    return header, pcm.astype(np.float32) / np.float32(PCM_SCALE)


# ------------------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class _FileInstruction:
    """What `ArrayRecordDataSource` takes to open a shard without reading it to count its records."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


class ShardReader:
    """Clip i of a shard directory as float32 mono 16 kHz; picklable, opens the shards lazily."""

    def __init__(self, directory: str, shards: list[tuple[str, int]], names: list[str]) -> None:
        self.directory, self.shards, self.names = directory, shards, names
        self._source: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}

    def record(self, i: int) -> bytes:
        if self._source is None:
            files = [_FileInstruction(os.path.join(self.directory, f), 0, n, n) for f, n in self.shards]
            self._source = ArrayRecordDataSource(files)
        try:
            return self._source[i]
        except Exception as e:  # noqa: BLE001 - array_record raises several types for a damaged file
            raise D2VError(f"{self.names[i]}: cannot read the record ({str(e).splitlines()[0][:200]})") from None

    def __call__(self, i: int) -> np.ndarray:
        return decode_record(self.record(i), self.names[i])[1]


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """OUT_DIR/index.json, checked: one line naming what is wrong."""
    path = Path(directory) / INDEX_NAME
    index = read_json_object(path)
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise D2VError(f"{path}: not a {FORMAT} version {VERSION} index (made by `d2v prepare`)")
    n = sum(int(s["records"]) for s in index["shards"])
    for key in ("num_samples", "sources"):
        if len(index[key]) != n:
            raise D2VError(f"{path}: {key} lists {len(index[key])} clips, the shards hold {n}")
    for s in index["shards"]:
        if not (Path(directory) / s["file"]).is_file():
            raise D2VError(f"{Path(directory) / s['file']}: shard listed in {path} is missing")
    return index


def open_shards(directory: str | os.PathLike) -> tuple[list[str], list[str] | None, np.ndarray, ShardReader]:
    """(clip names, transcripts or None, lengths at 16 kHz, reader) of a `d2v prepare` directory."""
    directory = os.path.abspath(os.fspath(directory))
    index = read_index(directory)
    names: list[str] = []
    for s in index["shards"]:
        names += [f"{directory}/{s['file']}[{j}]" for j in range(int(s["records"]))]
    names = [f"{name} ({source})" for name, source in zip(names, index["sources"], strict=True)]
    shards = [(s["file"], int(s["records"])) for s in index["shards"]]
    lengths = np.asarray(index["num_samples"], np.int64)
    return names, index.get("texts"), lengths, ShardReader(directory, shards, names)


def is_shard_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / INDEX_NAME).is_file()
