"""Manifests (TSV, fairseq, tfds), duration filters, bucketed batches, resume, process sharding."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from flax_d2v.audio import load_audio
from flax_d2v.errors import D2VError
from flax_d2v.train import manifests, planning
from flax_d2v.train import vocab as V
from flax_d2v.train.loader import LABEL_PAD, BatchLoader

NORM_TOL = 1e-5  # float32 normalisation of ~1e5 samples against a float64 reference
HF_PARITY_ATOL = 1e-6  # our padding/normalisation vs Wav2Vec2FeatureExtractor, both float32


@pytest.fixture(scope="module")
def manifest(speech_dir):
    return manifests.read_manifest(speech_dir / "transcripts.tsv", require_text=True)


@pytest.fixture(scope="module")
def vocab(manifest):
    return V.build_vocab(manifest.texts)


def loader(m, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("prefetch", 0)
    kw.setdefault("num_workers", 0)  # in this process: worker processes are tests/test_loader_workers.py
    return BatchLoader(m, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------ manifests
def test_transcripts_tsv_is_a_manifest(manifest, speech_dir):
    assert len(manifest) == 17
    assert manifest[0] == {
        "path": str(speech_dir / "16k/awb_arctic_a0007.wav"),
        "text": "And you always want to see it in the superlative degree.",
        "index": 0,
    }
    lengths = manifest.lengths()
    for i in (0, 7, 14):  # a 16 kHz clip, a short one, an 11.025 kHz one (resampled on load)
        n = len(load_audio(manifest.paths[i], warn=lambda _: None))
        assert n <= lengths[i] <= n + 1  # the header length is an upper bound of the resampled length


def test_tsv_relative_absolute_and_optional_columns(tmp_path, speech_dir):
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(speech_dir / "16k/cards_001.wav", clips / "a.wav")
    absolute = speech_dir / "16k/goforward.wav"
    (tmp_path / "pre.tsv").write_text(f"path\tspeaker\nclips/a.wav\tx\n{absolute}\ty\n\n")
    m = manifests.read_manifest(tmp_path / "pre.tsv")
    assert m.paths == [str(clips / "a.wav"), str(absolute)] and m.texts is None  # pretraining: path only
    assert [e["text"] for e in m] == [None, None]
    with pytest.raises(D2VError, match="pre.tsv: no transcripts"):
        manifests.read_manifest(tmp_path / "pre.tsv", require_text=True)
    (tmp_path / "n.tsv").write_text("num_samples\tpath\ttext\n123\tnowhere.wav\thi\n")
    m = manifests.read_manifest(tmp_path / "n.tsv")
    assert m.lengths().tolist() == [123] and m.texts == ["hi"]  # given lengths: no file is opened


@pytest.mark.parametrize(
    "content, message",
    [
        ("file\ttext\na.wav\thi\n", r"bad.tsv: no 'path' column"),
        ("path\ttext\na.wav\thi\textra\n", r"bad.tsv:2: expected 2 tab-separated columns, found 3"),
        ("path\tnum_samples\na.wav\t1.5\n", r"bad.tsv:2: column 'num_samples': not an integer"),
        ("path\ttext\n\ttext\n", r"bad.tsv:2: column 'path' is empty"),
        ("path\ttext\n", r"bad.tsv: manifest lists no clips"),
    ],
)
def test_bad_tsv_manifests(tmp_path, content, message):
    (tmp_path / "bad.tsv").write_text(content)
    with pytest.raises(D2VError, match=message):
        manifests.read_manifest(tmp_path / "bad.tsv")


def test_missing_files(tmp_path):
    with pytest.raises(D2VError, match="nope.tsv: no such manifest file"):
        manifests.read_manifest(tmp_path / "nope.tsv")
    (tmp_path / "m.tsv").write_text("path\nmissing.wav\n")
    with pytest.raises(D2VError, match="missing.wav: no such file"):
        manifests.read_manifest(tmp_path / "m.tsv").lengths()


def write_fairseq(tmp_path, speech_dir, names, root=None):
    root = root or str(speech_dir / "16k")
    rows = [f"{n}.wav\t{len(load_audio(speech_dir / '16k' / f'{n}.wav'))}" for n in names]
    (tmp_path / "train.tsv").write_text("\n".join([root, *rows]) + "\n")


def test_fairseq_manifest_with_ltr_and_wrd(tmp_path, speech_dir):
    write_fairseq(tmp_path, speech_dir, ["cards_001", "goforward"])
    m = manifests.read_manifest(tmp_path / "train.tsv")
    assert m.texts is None and m.paths[1] == str(speech_dir / "16k/goforward.wav")
    assert m.lengths().tolist() == [17526, 44580]
    (tmp_path / "train.wrd").write_text("TEN OF CLUBS\nGO FORWARD TEN METERS\n")
    assert manifests.read_manifest(tmp_path / "train.tsv").texts == ["TEN OF CLUBS", "GO FORWARD TEN METERS"]
    (tmp_path / "train.ltr").write_text("T E N | O F | C L U B S |\nG O | F O R W A R D | T E N | M E T E R S |\n")
    m = manifests.read_manifest(tmp_path / "train.tsv", require_text=True)  # .ltr preferred
    assert m.texts == ["TEN OF CLUBS", "GO FORWARD TEN METERS"]
    assert manifests.read_manifest(tmp_path / "train.tsv", labels="none").texts is None
    (tmp_path / "train.ltr").write_text("T E N |\n")
    with pytest.raises(D2VError, match=r"train.ltr: 1 lines but .*train.tsv lists 2 clips"):
        manifests.read_manifest(tmp_path / "train.tsv")
    (tmp_path / "train.wrd").unlink()
    with pytest.raises(D2VError, match="train.wrd: no such label file"):
        manifests.read_manifest(tmp_path / "train.tsv", labels="wrd")


def test_fairseq_relative_root_and_bad_rows(tmp_path, speech_dir):
    (tmp_path / "audio").symlink_to(speech_dir / "16k")
    write_fairseq(tmp_path, speech_dir, ["cards_003"], root="audio")
    assert manifests.read_manifest(tmp_path / "train.tsv").paths == [str(tmp_path / "audio/cards_003.wav")]
    (tmp_path / "train.tsv").write_text("/root\nclip.wav\n")
    with pytest.raises(D2VError, match=r"train.tsv:2: expected 'relative_path<TAB>num_samples'"):
        manifests.read_manifest(tmp_path / "train.tsv")


# ------------------------------------------------------------------------------------------ tfds
class _FakeLibriSpeech:
    """A random-access source shaped like tfds librispeech (int16 `speech`, `text`)."""

    def __init__(self, lengths):
        self.lengths = lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        speech = (rng.standard_normal(self.lengths[i]) * 3000).astype(np.int16)
        return {"speech": speech, "text": f"word number {i}", "id": f"{i}", "speaker_id": np.int64(1)}


def test_tfds_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):  # tfds' own mock of the librispeech features
        m = manifests.read_manifest("tfds:librispeech/train_clean100", require_text=True)
        assert len(m) == 3 and m[1]["path"] == "tfds:librispeech/train_clean100[1]"
        assert all(isinstance(t, str) for t in m.texts)
        x = m.load(2)
        assert x.dtype == np.float32 and len(x) == m.lengths()[2] and np.abs(x).max() <= 1.0
    lengths = [16000, 20000, 8000, 30000, 12000, 24000]
    cache = tmp_path / "lengths.json"
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: _FakeLibriSpeech(lengths)):
        m = manifests.read_manifest("tfds:librispeech/train_clean100", require_text=True, length_cache=cache)
        assert m.lengths().tolist() == lengths and m.texts[4] == "word number 4"
        batches = take(iter(loader(m, vocab=V.build_vocab(m.texts), seed=1, batch_size=2)), 3)
    assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == list(range(6))
    b = batches[0]
    i = int(b["index"][0])
    expected = _FakeLibriSpeech(lengths)[i]["speech"].astype(np.float32) / 32768
    expected = (expected - expected.mean()) / np.sqrt(expected.var() + 1e-7)
    np.testing.assert_allclose(b["input_values"][0, : lengths[i]], expected, rtol=NORM_TOL, atol=NORM_TOL)
    # The scan is cached: a second open reads lengths and texts from the cache, not the records.
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: _FakeLibriSpeech(lengths)):
        m2 = manifests.read_tfds("tfds:librispeech/train_clean100", length_cache=cache)
    assert m2.lengths().tolist() == lengths and m2.texts == m.texts


def test_tfds_offline_message(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(D2VError, match=r"tfds:librispeech/dev_clean: cannot open the prepared dataset.*tfds build"):
        manifests.read_manifest("tfds:librispeech/dev_clean", data_dir=str(tmp_path))
    with pytest.raises(D2VError, match="expected tfds:NAME/SPLIT"):
        manifests.read_manifest("tfds:librispeech")


# ------------------------------------------------------------------------------------------ filters and plans
def test_duration_filters(manifest):
    keep, dropped = planning.select_examples(manifest, min_seconds=1.5, max_seconds=6.5, require_text=True)
    secs = manifest.lengths()[keep] / 16000
    assert secs.min() >= 1.5 and secs.max() <= 6.5
    # cards_001 (1.1 s) too short; librivox_0870 (7.1 s) and the three untranscribed clips are > 6.5 s.
    assert dropped == {"too_short": 1, "too_long": 4, "no_text": 0}
    assert len(keep) == 17 - 5
    _, dropped = planning.select_examples(manifest, require_text=True)
    assert dropped == {"too_short": 0, "too_long": 0, "no_text": 3}


def test_bucket_ladder():
    ladder = planning.bucket_ladder(17526, 113600)
    assert ladder[0] >= 17526 and ladder[-1] >= 113600 and ladder[-2] < 113600
    assert np.all(ladder % planning.BUCKET_MULTIPLE == 0) and np.all(np.diff(ladder) > 0)
    assert np.all(ladder[1:] <= np.ceil(ladder[:-1] * 1.25 / 1600) * 1600)
    with pytest.raises(D2VError, match="bucket_growth"):
        planning.bucket_ladder(1, 10, growth=1.0)


@pytest.mark.parametrize("n, batch_size", [(14, 4), (37, 8), (16, 4)])
def test_plan_epoch_partitions_and_is_deterministic(n, batch_size):
    buckets = np.random.default_rng(0).integers(0, 5, size=n)
    plan = planning.plan_epoch(buckets, batch_size, seed=3, epoch=0)
    again = planning.plan_epoch(buckets, batch_size, 3, 0)
    assert [(k, r.tolist()) for k, r in plan] == [(k, r.tolist()) for k, r in again]
    rows = np.concatenate([r for _, r in plan])
    assert len(plan) == n // batch_size and len(set(rows.tolist())) == len(rows)  # no example twice
    for k, r in plan:
        assert r.size == batch_size and np.all(buckets[r] <= k)  # every clip fits its batch's padded length
    dropped = [
        set(range(n)) - set(np.concatenate([r for _, r in planning.plan_epoch(buckets, batch_size, 3, e)]).tolist())
        for e in range(6)
    ]
    if n % batch_size:
        assert len({frozenset(d) for d in dropped}) > 1  # a different remainder sits out each epoch
    assert planning.plan_epoch(buckets, batch_size, 3, 1)[0][1].tolist() != plan[0][1].tolist() or n == batch_size
    full = planning.plan_epoch(buckets, batch_size, 3, 0, shuffle=False, drop_remainder=False)
    rows = np.concatenate([r for _, r in full])
    assert sorted(rows[rows >= 0].tolist()) == list(range(n))  # evaluation: every clip exactly once
    assert np.all(rows[:n] >= 0) and np.all(rows[n:] == -1) and len(rows) - n == (-n) % batch_size  # filler trails


# ------------------------------------------------------------------------------------------ batches
def test_batch_contents(manifest, vocab):
    it = loader(manifest, vocab=vocab, seed=0)
    assert it.summary()["dropped"] == {"too_short": 0, "too_long": 0, "no_text": 3}
    for _ in range(it.batches_per_epoch):
        b = next(it)
        lengths = b["attention_mask"].sum(1)
        assert b["input_values"].shape[1] in it.bucket_samples and b["input_values"].dtype == np.float32
        assert b["attention_mask"].dtype == np.int32 and b["labels"].dtype == np.int32 and b["index"].dtype == np.int64
        np.testing.assert_allclose(b["seconds"], lengths / 16000)
        for r, i in enumerate(b["index"]):
            x = b["input_values"][r]
            w = load_audio(manifest.paths[i]).astype(np.float64)
            assert lengths[r] == len(w)
            assert np.all(x[lengths[r] :] == 0)
            expected = (w - w.mean()) / np.sqrt(w.var() + 1e-7)  # HF's rule, in float64
            np.testing.assert_allclose(x[: lengths[r]], expected, rtol=NORM_TOL, atol=NORM_TOL)
            n = b["label_lengths"][r]
            assert np.all(b["labels"][r, n:] == LABEL_PAD) and np.all(b["labels"][r, :n] >= 0)
            assert V.decode(b["labels"][r, :n], vocab, group_tokens=False) == V.normalize_transcript(manifest.texts[i])
        assert np.all(b["num_unknown"] == 0)


def test_few_shapes(manifest, vocab):
    """The (audio, label) shape is a function of the bucket, so XLA compiles one program per bucket."""
    it = loader(manifest, vocab=vocab, seed=5, batch_size=2)
    shapes = {(b["input_values"].shape, b["labels"].shape) for b in take(it, 5 * it.batches_per_epoch)}
    widths = dict((s[0][1], s[1][1]) for s in shapes)
    assert len(widths) == len(shapes) <= len(it.bucket_samples)
    assert all(widths[w] == it.label_widths[list(it.bucket_samples).index(w)] for w in widths)


def test_unknown_characters_are_counted(manifest):
    small = V.build_vocab(["ab"])  # no E, T, ...: nearly everything is <unk>
    it = loader(manifest, vocab=small, batch_size=2)
    b = next(it)
    for r, i in enumerate(b["index"]):
        text = V.normalize_transcript(manifest.texts[i])
        assert b["num_unknown"][r] == sum(c not in "AB " for c in text)
    assert it.summary()["unknown_chars"] > 0


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_gives_the_same_stream(manifest, vocab, prefetch):
    kw = dict(vocab=vocab, seed=7, prefetch=prefetch)
    ref = loader(manifest, **kw)
    stream = take(ref, 8)  # crosses epoch boundaries (3 batches per epoch)
    assert {k: ref.state()[k] for k in ("epoch", "batch_in_epoch")} == {"epoch": 2, "batch_in_epoch": 2}
    ref.close()
    for cut in (2, 3, 5):
        a = loader(manifest, **kw)
        take(a, cut)
        state = dict(a.state())
        a.close()
        b = loader(manifest, **kw)
        b.restore(state)
        for want in stream[cut:]:
            got = next(b)
            assert got.keys() == want.keys()
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
        b.close()
    other = take(loader(manifest, vocab=vocab, seed=8), 3)
    assert any(not np.array_equal(x["index"], y["index"]) for x, y in zip(other, stream, strict=False))


def test_restore_rejects_bad_state(manifest):
    it = loader(manifest)
    with pytest.raises(D2VError, match="data state"):
        it.restore({"epoch": 0})
    with pytest.raises(D2VError, match="outside this data"):
        it.restore({"epoch": 0, "batch_in_epoch": 99})


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_sharding_disjoint_and_covering(manifest, vocab, process_count):
    full = take(loader(manifest, vocab=vocab, seed=1, batch_size=8), 2)
    shards = [
        take(loader(manifest, vocab=vocab, seed=1, batch_size=8, process_index=p, process_count=process_count), 2)
        for p in range(process_count)
    ]
    for step, whole in enumerate(full):
        parts = [s[step] for s in shards]
        assert all(len(p["index"]) == 8 // process_count for p in parts)
        idx = np.concatenate([p["index"] for p in parts])
        assert len(set(idx.tolist())) == 8  # disjoint
        for key in whole:  # and together exactly the global batch, same padding
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    with pytest.raises(D2VError, match="multiple of the process count"):
        loader(manifest, batch_size=6, process_count=4)


def test_eval_pass_covers_everything_once(manifest, vocab):
    it = loader(
        manifest,
        vocab=vocab,
        batch_size=4,
        shuffle=False,
        repeat=False,
        drop_remainder=False,
        process_index=1,
        process_count=2,
        prefetch=2,
    )
    batches = list(it)
    assert len(batches) == it.batches_per_epoch == 4  # 14 clips -> 3 full batches + 1 topped up
    full = list(loader(manifest, vocab=vocab, batch_size=4, shuffle=False, repeat=False, drop_remainder=False))
    idx = np.concatenate([b["index"] for b in full])
    assert sorted(idx[idx >= 0].tolist()) == sorted(it.positions.tolist())
    last = full[-1]
    filler = last["index"] < 0
    assert filler.sum() == 2 and np.all(last["attention_mask"][filler] == 0)
    assert np.all(last["labels"][filler] == LABEL_PAD) and np.all(last["label_lengths"][filler] == 0)
    with pytest.raises(StopIteration):
        next(it)


def test_errors_in_the_prefetch_threads_reach_the_caller(tmp_path, speech_dir):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF1234WAVEnot really audio")
    good = speech_dir / "16k/cards_001.wav"
    (tmp_path / "m.tsv").write_text(f"path\tnum_samples\n{good}\t17526\n{broken}\t17000\n")
    it = loader(manifests.read_manifest(tmp_path / "m.tsv"), batch_size=2, prefetch=2)
    with pytest.raises(D2VError, match="broken.wav"):
        next(it)
    it.close()
    (tmp_path / "m.tsv").write_text(f"path\tnum_samples\n{good}\t8000\n")
    with pytest.raises(D2VError, match="cards_001.wav: decoded to 17526 samples, more than the 8000"):
        next(loader(manifests.read_manifest(tmp_path / "m.tsv"), batch_size=1))


def test_matches_transformers_feature_extractor(manifest, tmp_path):
    transformers = pytest.importorskip("transformers")
    V.save_preprocessor_config(tmp_path)
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tmp_path)
    it = loader(manifest, batch_size=4, seed=2)
    b = next(it)
    waves = [load_audio(manifest.paths[i]) for i in b["index"]]
    ref = fe(
        waves,
        sampling_rate=16000,
        padding="max_length",
        max_length=b["input_values"].shape[1],
        return_attention_mask=True,
        return_tensors="np",
    )
    np.testing.assert_allclose(b["input_values"], ref["input_values"], atol=HF_PARITY_ATOL)
    np.testing.assert_array_equal(b["attention_mask"], ref["attention_mask"])
