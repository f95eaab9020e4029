"""The `DataSource` protocol (train/source.py): another input pipeline drops into the loop.

A list-backed source, the protocol's smallest case, drives `Trainer.fit` through a short run; a
run stopped after 3 updates and resumed from its checkpoint (the source's `state()` saved there,
`restore` at the start) logs the unbroken run's losses for every later update. On the old loop
(`next(loader)` on the object itself, nothing saved unless `data_state=` was passed) a source whose
`__iter__` is a generator did not run and a resumed run restarted the data from the beginning.
The loader pads whatever target ids the objective's `LabelEncoder` gives; CTC's comes from
`CTCObjective.label_encoder` and gives the batches `vocab=` always gave.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec
from synth_speech import write_corpus

from flax_d2v.errors import D2VError
from flax_d2v.train import sharding
from flax_d2v.train.ctc import CTCObjective
from flax_d2v.train.data2vec_objective import CroppedBatches
from flax_d2v.train.loader import LABEL_PAD, BatchLoader
from flax_d2v.train.loop import LoopConfig, Trainer
from flax_d2v.train.manifests import read_manifest
from flax_d2v.train.objective import NoExtra
from flax_d2v.train.source import DataSource, LabelEncoder
from flax_d2v.train.vocab import build_vocab

# Same program on the same batches after an exact restore (as tests/test_resume.py): the logged
# float may differ in nothing but the last ulp.
RESUME_RTOL = 1e-6
STEPS = 7  # more updates than the source has batches: the position runs past one pass
STOP_AT = 3


class ListSource:
    """Batches held in memory, repeated endlessly; the position is the count handed out."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches, self.position, self.closed = batches, 0, False

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1  # before handing it out: state() is the position after it
            yield batch

    def state(self) -> dict[str, Any]:
        return {"position": self.position}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.position = int(state["position"])

    def close(self) -> None:
        self.closed = True


@dataclasses.dataclass(frozen=True)
class LeastSquares(NoExtra):
    """A one-matrix objective: the test is about the data path, not the model."""

    name: str = "least_squares"

    def loss(self, params, extra, batch, rng, step):
        err = jnp.square(batch["x"] @ params["w"] - batch["y"]).sum(-1)
        return err.sum(), jnp.asarray(err.shape[0], jnp.float32), {}


def _batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [
        {"x": rng.normal(size=(4, 3)).astype(np.float32), "y": rng.normal(size=(4, 2)).astype(np.float32)}
        for _ in range(5)
    ]


def _run(out: Path, steps: int) -> tuple[ListSource, dict, int]:
    """One invocation of a run: start (or resume) in `out`, train to `steps`, finish."""
    schedule = optax.constant_schedule(0.1)
    cfg = LoopConfig(out_dir=str(out), steps=steps, log_every=1, save_every=0, progress=False)
    trainer = Trainer(
        LeastSquares(), optax.sgd(schedule), schedule, sharding.make_mesh(None), {"w": PartitionSpec()}, cfg
    )
    state, data_state, start = trainer.start({"w": np.zeros((3, 2), np.float32)}, seed=0)
    source = ListSource(_batches())
    if data_state:
        source.restore(data_state)
    try:
        trainer.fit(state, source, start)  # no data_state=: the loop saves source.state() itself
    finally:
        source.close()
    trainer.finish()
    return source, data_state, start


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_list_backed_source_trains_and_resumes_exactly(tmp_path):
    unbroken, _, _ = _run(tmp_path / "unbroken", STEPS)
    assert unbroken.position == STEPS and unbroken.closed
    reference = _losses(tmp_path / "unbroken")
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert len({round(v, 6) for v in reference.values()}) > 1  # the batches differ, so the order shows

    _run(tmp_path / "stopped", STOP_AT)
    resumed, data_state, start = _run(tmp_path / "stopped", STEPS)
    assert (start, data_state) == (STOP_AT, {"position": STOP_AT})  # what state() gave, from the checkpoint
    assert resumed.position == STEPS
    losses = _losses(tmp_path / "stopped")
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [losses[s] for s in range(1, STEPS + 1)], [reference[s] for s in range(1, STEPS + 1)], rtol=RESUME_RTOL
    )


def test_the_project_loaders_are_data_sources(tmp_path):
    manifest = read_manifest(write_corpus(tmp_path, 4), require_text=False)
    loader = BatchLoader(manifest, batch_size=2, prefetch=0, num_workers=0)
    assert isinstance(loader, DataSource) and isinstance(CroppedBatches(loader, 0), DataSource)
    assert isinstance(ListSource(_batches()), DataSource)
    assert not isinstance(iter(_batches()), DataSource)  # a bare iterator has no position to save


def test_the_loader_pads_whatever_ids_the_objectives_encoder_gives(tmp_path):
    """Labels are the objective's business: any `LabelEncoder` goes through the same padding."""
    manifest = read_manifest(write_corpus(tmp_path, 4), require_text=True)

    def word_lengths(text: str) -> tuple[list[int], int]:  # not CTC: one id per word, its length
        return [len(w) for w in text.split()], sum(len(w) > 5 for w in text.split())

    assert isinstance(word_lengths, LabelEncoder)
    loader = BatchLoader(manifest, batch_size=2, labels=word_lengths, shuffle=False, prefetch=0, num_workers=0)
    for batch in [next(loader) for _ in range(loader.batches_per_epoch)]:
        for row, i in enumerate(batch["index"]):
            ids, unknown = word_lengths(manifest.texts[i])
            assert batch["labels"][row, : len(ids)].tolist() == ids
            assert np.all(batch["labels"][row, len(ids) :] == LABEL_PAD)
            assert (batch["label_lengths"][row], batch["num_unknown"][row]) == (len(ids), unknown)

    # CTC's encoder comes from its objective; `vocab=` is shorthand for it: the same batches
    vocab = build_vocab(manifest.texts)
    kw = dict(batch_size=2, seed=1, prefetch=0, num_workers=0)
    from_objective = BatchLoader(manifest, labels=CTCObjective(None, vocab=vocab).label_encoder, **kw)
    from_vocab = BatchLoader(manifest, vocab=vocab, **kw)
    for a, b in zip([next(from_objective) for _ in range(3)], [next(from_vocab) for _ in range(3)], strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert "labels" not in next(BatchLoader(manifest, **kw))  # no encoder (pretraining): no labels
    with pytest.raises(D2VError, match="not both"):
        BatchLoader(manifest, vocab=vocab, labels=word_lengths, **kw)


def test_the_data_state_is_a_grain_item_and_old_data_items_are_accepted(tmp_path):
    """The loader's state goes into the checkpoint through grain's orbax handler (item `iterator`,
    one JSON file per process); a checkpoint written before (the thread loader's JSON item `data`:
    `{epoch, batch_in_epoch}`) still resumes, at the same batch of the same plan."""
    import orbax.checkpoint as ocp

    from flax_d2v.train.checkpoint import Checkpointer

    manifest = read_manifest(write_corpus(tmp_path / "data", 6), require_text=False)
    kw = dict(batch_size=2, seed=4, prefetch=0, num_workers=0)
    with BatchLoader(manifest, **kw) as ref:
        want = [next(ref) for _ in range(7)]
    state = {"w": np.arange(3, dtype=np.float32)}
    with BatchLoader(manifest, **kw) as loader:
        [next(loader) for _ in range(4)]
        ckpt = Checkpointer(tmp_path / "new", async_save=False)
        ckpt.save(4, state, loader.state(), {"step": 4})
        ckpt.close()
    saved = loader.state()
    written = json.loads((tmp_path / "new" / "4" / "iterator" / "process_0-of-1.json").read_text())
    assert written == loader.state()
    ckpt = Checkpointer(tmp_path / "new", async_save=False)
    restored_state, data_state, meta = ckpt.restore(4, state)
    assert data_state == saved and meta == {"step": 4} and "grain" in data_state
    ckpt.close()

    old = ocp.CheckpointManager(tmp_path / "old", item_names=("state", "data", "meta"))
    old_position = {"epoch": 1, "batch_in_epoch": 1}  # 3 batches per epoch: batch 4 of the plan
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(old_position), meta=ocp.args.JsonSave({"step": 4})
    )
    old.save(4, args=args)
    old.wait_until_finished()
    old.close()
    ckpt = Checkpointer(tmp_path / "old", async_save=False)
    _, data_state, _ = ckpt.restore(4, state)
    ckpt.close()
    assert data_state == old_position
    for given in (saved, data_state):
        with BatchLoader(manifest, **kw) as resumed:
            resumed.restore(given)
            got = [next(resumed) for _ in range(3)]
        for a, b in zip(got, want[4:], strict=True):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
