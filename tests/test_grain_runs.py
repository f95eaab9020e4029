"""`d2v finetune` and `d2v pretrain` (1.0 and 2.0) on the grain pipeline, from every kind of source:
TSV, fairseq, tfds and `d2v prepare` shards, with worker processes (tfds: tfds' mock lives only
in this process, so in this process). And the real command, stopped by SIGTERM with its workers
busy, leaves no process behind. All slow: each is a real (tiny) run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from synth_speech import write_corpus
from test_data import _FakeLibriSpeech
from test_loader_workers import _alive, _children

from flax_d2v import train
from flax_d2v.train.metrics import read_metrics
from flax_d2v.train.prepare import prepare

pytestmark = pytest.mark.slow


def _finetune(train_spec, out, workers, **kw):
    cfg = dict(train=str(train_spec), preset="tiny", out=str(out), steps=2, batch_size=2, learning_rate=1e-4)
    cfg.update(log_every=1, progress=False, num_workers=workers, async_checkpoint=False, export_hf=False, **kw)
    return train.finetune(cfg)


def _pretrain(train_spec, out, workers, **kw):
    cfg = dict(train=str(train_spec), preset="tiny", out=str(out), steps=2, batch_size=2, min_seconds=None)
    cfg.update(log_every=1, progress=False, num_workers=workers, async_checkpoint=False, export_hf=False, **kw)
    return train.pretrain(cfg)


def _logged(out):
    return [r["step"] for r in read_metrics(out) if "loss" in r]


def test_finetune_and_pretrain_from_shards_tsv_and_fairseq_with_workers(tmp_path):
    tsv = write_corpus(tmp_path / "data", 4)
    shards = tmp_path / "shards"
    prepare(tsv, shards, shards=2, progress=False)
    fairseq = tmp_path / "fs.tsv"
    rows = [line.split("\t")[0] for line in tsv.read_text().splitlines()[1:]]
    fairseq.write_text("\n".join(["/", *[f"{p.lstrip('/')}\t8000" for p in rows]]) + "\n")
    fairseq.with_suffix(".wrd").write_text("\n".join(["TEN", "OF CLUBS", "GO", "FORWARD"]) + "\n")
    for name, spec in (("shards", shards), ("tsv", tsv), ("fairseq", fairseq)):
        assert _finetune(spec, tmp_path / f"ft-{name}", 1).step == 2
        assert _logged(tmp_path / f"ft-{name}") == [1, 2]
    assert _pretrain(shards, tmp_path / "pt", 1, average_top_k_layers=2).step == 2
    assert _pretrain(shards, tmp_path / "pt2", 2, arch="data2vec2", average_top_k_layers=2, clone_batch=2).step == 2
    assert _logged(tmp_path / "pt") == _logged(tmp_path / "pt2") == [1, 2]


def test_finetune_and_pretrain_from_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    lengths = [16000, 20000, 8000, 12000]
    with tfds.testing.mock_data(as_data_source_fn=lambda *a, **k: _FakeLibriSpeech(lengths)):
        assert _finetune("tfds:librispeech/train_clean100", tmp_path / "ft", 0).step == 2
        assert _pretrain("tfds:librispeech/train_clean100", tmp_path / "pt", 0, average_top_k_layers=2).step == 2


def test_sigterm_with_workers_busy_leaves_no_process_behind(tmp_path):
    tsv = write_corpus(tmp_path / "data", 8)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "flax_d2v.cli", "pretrain", "--train", str(tsv), "--out", str(out)]
    argv += ["--config", "tiny", "--steps", "1000", "--batch-size", "2", "--min-seconds", "0", "--log-every", "1"]
    argv += ["--average-top-k-layers", "2", "--no-progress", "--num-workers", "2", "--save-every", "1000"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 600
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "no progress"
            time.sleep(0.1)
        workers = {c for c in _children(proc.pid) if b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()}
        assert len(workers) == 2, workers
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "received SIGTERM" in text, text
        assert [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()]  # it saved, then stopped
        assert not [w for w in workers if _alive(w)]  # joined by the loader, not left behind
        state = json.loads(next((out / "checkpoints").glob("*/iterator/process_0-of-1.json")).read_text())
        assert state["grain"]["num_workers"] == 2
    finally:
        if proc.poll() is None:
            proc.kill()
