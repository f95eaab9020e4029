"""Subprocess body of tests/test_sharding.py: runs the CTC train step on several layouts and prints JSON.

Run with `XLA_FLAGS=--xla_force_host_platform_device_count=N` already in the environment (it must be
set before jax is imported, which is why these checks live in a subprocess). Modes:

- `layouts`: one process, 8 devices. Losses of the first steps on one device, data=8, fsdp=8,
  data=2,fsdp=4 and under pmap; per-device bytes of params+opt under fsdp=8 vs one device; a
  checkpoint written under fsdp=8 restored under data=8 and on one device.
- `process`: one of two processes (4 devices each) joined through jax.distributed; process 0
  prints the losses of the same steps on mesh data=8 over both processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

STEPS = 3
# Dropout and LayerDrop on: every layout must draw the same bits (per example) and the same LayerDrop
# decisions (per update), pmap included.
DROPOUT = 0.2


def build(manifest: str, process_index: int = 0, process_count: int = 1, dropout: float = DROPOUT):
    from flax_d2v.config import tiny_config
    from flax_d2v.modeling import Data2VecAudioForCTC, init_params, logical_axes
    from flax_d2v.train import vocab as V
    from flax_d2v.train.ctc import CTCObjective
    from flax_d2v.train.loader import BatchLoader
    from flax_d2v.train.manifests import read_manifest
    from flax_d2v.train.schedules import constant
    from flax_d2v.train.state import make_optimizer

    m = read_manifest(manifest, require_text=True)
    vocab = V.build_vocab(m.texts)
    # SpecAugment masks, dropout and LayerDrop on: drawn from (seed, step, example index), they must agree on
    # every layout.
    config = tiny_config(
        vocab_size=len(vocab),
        hidden_dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
        feat_proj_dropout=dropout,
        final_dropout=dropout,
        layerdrop=dropout,
        mask_time_prob=0.3,
        mask_time_length=3,
        mask_feature_prob=0.2,
        mask_feature_length=4,
    )
    module = Data2VecAudioForCTC(config, freeze_feature_encoder=True)
    params = init_params(module, 0)
    sched = constant(1e-3)
    tx = make_optimizer(params, sched, clip_norm=1.0)
    objective = CTCObjective(module)  # SpecAugment settings from the config above
    loader = BatchLoader(
        m, batch_size=8, vocab=vocab, seed=0, prefetch=0, process_index=process_index, process_count=process_count
    )
    batches = [next(loader) for _ in range(STEPS)]
    return objective, tx, sched, params, logical_axes(module), batches


def losses(out_dir: Path, mesh_spec: str | None, pmap: bool, built, devices=None) -> tuple[list[float], object]:
    from flax_d2v.train import sharding as S
    from flax_d2v.train.loop import LoopConfig, Trainer

    objective, tx, sched, params, axes, batches = built
    mesh = S.make_mesh(mesh_spec, devices=devices)
    cfg = LoopConfig(out_dir=str(out_dir), steps=STEPS, log_every=1, save_every=0, use_pmap=pmap, progress=False)
    trainer = Trainer(objective, tx, sched, mesh, axes, cfg)
    state, _, _ = trainer.start(params, seed=0)
    result = trainer.fit(state, iter(batches), 0)
    trainer.finish()
    rows = (
        [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        if jax.process_index() == 0
        else []
    )
    return [r["loss"] for r in rows], (trainer, result)


def layouts(manifest: str, out: Path) -> dict:
    built = build(manifest)
    report: dict = {"losses": {}}
    one, (t1, r1) = losses(out / "one", None, False, built, devices=jax.devices()[:1])
    report["losses"]["one"] = one
    for name, spec in (("data=8", "data=8"), ("fsdp=8", "fsdp=8"), ("data=2,fsdp=4", "data=2,fsdp=4")):
        report["losses"][name], (trainer, result) = losses(out / name.replace(",", "_"), spec, False, built)
        if name == "fsdp=8":
            r_fsdp = result
    report["losses"]["pmap"], _ = losses(out / "pmap", None, True, built)

    from flax_d2v.train import sharding as S

    tree = lambda r: (r.state.params, r.state.opt_state)
    one_dev = S.bytes_per_device(tree(r1))
    fsdp = S.bytes_per_device(tree(r_fsdp))
    report["bytes_one_device"] = max(one_dev.values())
    report["bytes_fsdp8_per_device"] = max(fsdp.values())
    ratio = report["bytes_fsdp8_per_device"] / report["bytes_one_device"]
    print(
        f"params+opt bytes: one device {report['bytes_one_device']}, fsdp=8 per device "
        f"{report['bytes_fsdp8_per_device']} (ratio {ratio:.4f})",
        file=sys.stderr,
    )

    # cross-mesh restore: the fsdp=8 run's last checkpoint under data=8 and on one device
    from flax_d2v.train.loop import LoopConfig, Trainer

    objective, tx, sched, params, axes, _ = built
    saved = jax.tree.map(np.asarray, r_fsdp.state.params)
    restored = {}
    for name, spec, devs in (("data=8", "data=8", None), ("one", None, jax.devices()[:1])):
        trainer = Trainer(
            objective,
            tx,
            sched,
            S.make_mesh(spec, devices=devs),
            axes,
            LoopConfig(out_dir=str(out / "fsdp=8"), steps=STEPS, progress=False),
        )
        state, _, step = trainer.start(params, seed=0)
        same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), state.params, saved))
        shardings = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
        restored[name] = {
            "step": step,
            "equal": all(same),
            "devices": len(jax.tree.leaves(state.params)[0].devices()),
            "specs": sorted(shardings),
        }
        trainer.finish()
    report["restore"] = restored
    return report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("layouts", "process"))
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--coordinator")
    p.add_argument("--process-id", type=int)
    p.add_argument("--num-processes", type=int)
    a = p.parse_args()
    out = Path(a.out)
    if a.mode == "layouts":
        report = layouts(a.manifest, out)

    else:
        from flax_d2v.train import sharding as S

        S.initialize_distributed(a.coordinator, a.num_processes, a.process_id)
        built = build(a.manifest, jax.process_index(), jax.process_count())
        loss, _ = losses(out, "data=8", False, built)
        report = {"losses": loss, "process_count": jax.process_count(), "devices": jax.device_count()}
    if jax.process_index() == 0:
        print("RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
