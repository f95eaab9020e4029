"""`d2v prepare`: ArrayRecord shards of a manifest's clips, read back by `--train OUT_DIR`.

The shards hold each clip at 16 kHz as 16-bit PCM (or FLAC of it): a 16 kHz 16-bit file reads back
bit for bit, so a run on the shards trains on exactly the batches of a run on the files; a
resampled clip differs by the 16-bit rounding only. A bad clip is named in one line and skipped,
or refused with --strict; OUT_DIR appears only complete.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from flax_d2v.audio import load_audio
from flax_d2v.errors import D2VError
from flax_d2v.train import shards as S
from flax_d2v.train.classification import read_label_column
from flax_d2v.train.loader import BatchLoader
from flax_d2v.train.manifests import read_manifest
from flax_d2v.train.prepare import prepare
from flax_d2v.train.vocab import build_vocab

# Rounding a float32 waveform to 16 bits moves a sample by at most half a step: 0.5 / 32768.
PCM16_ATOL = 0.5 / 32768 + 1e-9


@pytest.fixture(scope="module")
def prepared(speech_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "speech"
    report = prepare(speech_dir / "transcripts.tsv", out, shards=3, progress=False)
    return out, report


def test_shards_hold_every_clip_at_16k_with_its_text_and_columns(prepared, speech_dir):
    out, report = prepared
    files = read_manifest(speech_dir / "transcripts.tsv")
    m = read_manifest(out)
    assert report["clips"] == len(m) == len(files) == 17 and report["shards"] == 3 and report["skipped"] == 0
    assert sorted(p.name for p in out.iterdir()) == [S.shard_name(i, 3) for i in range(3)] + [S.INDEX_NAME]
    assert m.texts == files.texts
    assert read_label_column(out, "speaker") == read_label_column(speech_dir / "transcripts.tsv", "speaker")
    sample_rates = read_label_column(speech_dir / "transcripts.tsv", "sample_rate")
    for i in range(len(m)):
        want = load_audio(files.paths[i], warn=lambda _: None)
        got = m.load(i)
        assert got.dtype == np.float32 and len(got) == len(want) == m.num_samples[i]
        if sample_rates[i] == "16000":  # a 16 kHz 16-bit file: bit for bit
            np.testing.assert_array_equal(got, want)
        else:  # resampled: the 16-bit rounding only
            np.testing.assert_allclose(got, np.clip(want, -1, 32767 / 32768), atol=PCM16_ATOL, rtol=0)
        assert files.paths[i] in m.paths[i]  # errors name the clip's source


def test_a_run_on_the_shards_sees_the_batches_of_the_files(speech_dir, tmp_path):
    lines = (speech_dir / "transcripts.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rate = header.index("sample_rate")
    keep = [lines[0]] + [line for line in lines[1:] if line.split("\t")[rate] == "16000"]
    tsv = tmp_path / "16k.tsv"
    tsv.write_text("\n".join(line.replace("16k/", f"{speech_dir}/16k/") for line in keep) + "\n")
    prepare(tsv, tmp_path / "pcm", progress=False)
    prepare(tsv, tmp_path / "flac", audio="flac", progress=False)
    files = read_manifest(tsv, require_text=True)
    vocab = build_vocab(files.texts)
    kw = dict(batch_size=3, vocab=vocab, seed=2, prefetch=0, num_workers=0)
    with BatchLoader(files, **kw) as a, BatchLoader(read_manifest(tmp_path / "pcm"), **kw) as b:
        with BatchLoader(read_manifest(tmp_path / "flac"), **kw) as c:
            assert b.batches_per_epoch == a.batches_per_epoch
            for _ in range(a.batches_per_epoch + 1):
                x, y, z = next(a), next(b), next(c)
                for k in x:
                    np.testing.assert_array_equal(y[k], x[k], err_msg=k)
                    np.testing.assert_array_equal(z[k], x[k], err_msg=k)
    assert (tmp_path / "flac").stat().st_size > 0
    size = lambda d: sum(p.stat().st_size for p in d.iterdir())  # noqa: E731
    assert size(tmp_path / "flac") < size(tmp_path / "pcm")


def test_a_bad_clip_is_named_and_skipped_or_refused(tmp_path, speech_dir, capfd):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF1234WAVEnot really audio")
    good = speech_dir / "16k/cards_001.wav"
    tsv = tmp_path / "m.tsv"
    tsv.write_text(f"path\ttext\tlabel\n{good}\tten of clubs\ta\n{broken}\tx\tb\n{good}\tagain\tc\n")
    with pytest.raises(D2VError, match=r"broken.wav: .*--strict"):
        prepare(tsv, tmp_path / "strict", strict=True, progress=False)
    assert not (tmp_path / "strict").exists() and not list(tmp_path.glob(".strict*"))  # nothing half-written
    report = prepare(tsv, tmp_path / "out", progress=False)
    err = capfd.readouterr().err
    skipped = [line for line in err.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 1 and "broken.wav" in skipped[0]
    assert report["clips"] == 2 and report["skipped"] == 1
    index = json.loads((tmp_path / "out" / S.INDEX_NAME).read_text())
    assert index["skipped"][0]["path"] == str(broken)
    m = read_manifest(tmp_path / "out")
    assert m.texts == ["ten of clubs", "again"] and read_label_column(tmp_path / "out", "label") == ["a", "c"]
    with pytest.raises(D2VError, match="not empty"):
        prepare(tsv, tmp_path / "out", progress=False)
    with pytest.raises(D2VError, match="no 'speaker' column among the prepared columns"):
        read_label_column(tmp_path / "out", "speaker")


def test_the_reader_pickles_without_its_open_shards(prepared):
    out, _ = prepared
    m = read_manifest(out)
    first = m.load(5)  # opens the shards in this process
    clone = pickle.loads(pickle.dumps(m))
    assert clone._reader._source is None  # a worker opens its own
    np.testing.assert_array_equal(clone.load(5), first)


def test_damaged_shards_fail_in_one_line(prepared, tmp_path):
    out, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    index = json.loads((copy / S.INDEX_NAME).read_text())
    (copy / index["shards"][1]["file"]).unlink()
    with pytest.raises(D2VError, match=r"clips-00001-of-00003.array_record: shard listed in .* is missing"):
        read_manifest(copy)
    with pytest.raises(D2VError, match="not a flax-d2v shard record"):
        S.decode_record(b"garbage!", "x")


def test_d2v_prepare_command(speech_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "flax_d2v.cli", "prepare", str(speech_dir / "transcripts.tsv"), str(tmp_path / "o")]
        + ["--shards", "2", "--format", "flac"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["clips"] == 17 and report["shards"] == 2
    assert "d2v prepare" in out.stderr and "clip/s" in out.stderr  # the progress bar
