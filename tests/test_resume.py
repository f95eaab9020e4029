"""Preemption and resume, as fairseq and MaxText users expect them (issue 14).

A run stopped by SIGTERM at an arbitrary update (mid-epoch, no periodic checkpoint anywhere near
it: `--save-every 1000`) and started again with the same command logs exactly the losses of an
unbroken run for every later update, with dropout, LayerDrop and SpecAugment on, for `finetune`
and `pretrain` (EMA teacher included), on one device and on an 8-device mesh. A kill -9 in the
middle of a checkpoint write leaves the previous checkpoint usable, and a run resumed from it
again logs the unbroken run's losses.

Everything runs as the real command in a subprocess on a synthetic corpus of equal-length clips
(`synth_speech.py`: one bucket, so one compiled step), three or more batches per epoch, so the
data position and the epoch's plan matter. These checks fail if the save on SIGTERM, the
restore of the state (params, optimizer, EMA teacher, rng) or of the loader's position is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from synth_speech import write_corpus

# Same program on the same inputs after an exact restore: the bar (in practice the losses are
# bit-identical; 1e-6 leaves room for nothing but a last-ulp difference in the logged float).
RESUME_RTOL = 1e-6
STEPS = 14  # batches per epoch: 3, so the kill lands in the middle of an epoch after the first
KILL_AFTER = 5  # SIGTERM once this many updates are logged (the process is stopped first, so few more run)


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _argv(command: str, manifest: Path, out: Path, devices: int) -> list[str]:
    batch = 2 if devices == 1 else 8
    common = [
        "--train",
        str(manifest),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--batch-size",
        str(batch),
        "--seed",
        "3",
        "--save-every",
        "1000",
        "--log-every",
        "1",
        "--no-progress",
        "--no-export-hf",
        "--num-workers",
        "1",
    ]
    if devices > 1:
        common += ["--mesh", "data=2,fsdp=4"]
    if command == "finetune":  # tri-stage schedule, dropout + LayerDrop + time and channel masks on
        return [
            "finetune",
            *common,
            "--model",
            "tiny",
            "--learning-rate",
            "1e-3",
            "--dropout",
            "0.1",
            "--mask-time-prob",
            "0.3",
            "--mask-time-length",
            "2",
            "--mask-feature-prob",
            "0.2",
            "--mask-feature-length",
            "4",
        ]
    # fairseq's recipe: dropout 0.1, LayerDrop 0.05, span masks, EMA teacher, crop to the shortest clip
    return [
        "pretrain",
        *common,
        "--config",
        "tiny",
        "--average-top-k-layers",
        "2",
        "--mask-length",
        "3",
        "--ema-decay",
        "0.9",
        "--ema-end-decay",
        "0.99",
        "--ema-anneal-end-step",
        "10",
        "--min-seconds",
        "0",
    ]


def _cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "flax_d2v.cli", *argv]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)), steps  # no duplicate, no reordering
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def _logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _sigterm_midway(argv: list[str], run: Path, env: dict) -> tuple[int, str]:
    """Start the command, SIGTERM it once KILL_AFTER updates are logged; (stopped step, its output)."""
    proc = subprocess.Popen(_cmd(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 600
        while _logged(run) < KILL_AFTER:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no progress after 600 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)  # freeze it at once, so the SIGTERM lands well before the last update
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out, out
    steps = _checkpoints(run)
    assert len(steps) == 1, steps  # only the checkpoint written on SIGTERM: nothing periodic to fall back on
    return steps[0], out


def _check_resume_is_exact(tmp_path: Path, command: str, devices: int) -> None:
    clips = 6 if devices == 1 else 24  # 3 batches per epoch
    manifest = write_corpus(tmp_path / "data", clips, text=command == "finetune")
    env = _env(devices)
    ref, run = tmp_path / "unbroken", tmp_path / "run"
    unbroken = subprocess.run(
        _cmd(_argv(command, manifest, ref, devices)), capture_output=True, text=True, env=env, timeout=900
    )
    assert unbroken.returncode == 0, unbroken.stderr[-4000:]
    assert '"batches_per_epoch": 3' in unbroken.stderr
    want = _losses(ref)
    assert sorted(want) == list(range(1, STEPS + 1))

    stopped, _ = _sigterm_midway(_argv(command, manifest, run, devices), run, env)
    assert KILL_AFTER <= stopped < STEPS - 2, stopped
    resumed = subprocess.run(
        _cmd(_argv(command, manifest, run, devices)), capture_output=True, text=True, env=env, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"(step {stopped})" in resumed.stderr
    got = _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    later = list(range(stopped + 1, STEPS + 1))
    np.testing.assert_allclose(
        [got[s] for s in later],
        [want[s] for s in later],
        rtol=RESUME_RTOL,
        err_msg=f"{command}, {devices} device(s), stopped at {stopped}",
    )
    np.testing.assert_allclose(
        [got[s] for s in range(1, stopped + 1)], [want[s] for s in range(1, stopped + 1)], rtol=RESUME_RTOL
    )


@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_sigterm_at_an_arbitrary_update_then_resume_logs_the_unbroken_losses(tmp_path, command):
    _check_resume_is_exact(tmp_path, command, devices=1)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["finetune", "pretrain"])
def test_sigterm_resume_is_exact_on_an_8_device_mesh(tmp_path, command):
    _check_resume_is_exact(tmp_path, command, devices=8)


# kill -9 while checkpoint KILL_STEP is being committed (its files written into orbax's temporary
# directory, not yet renamed): the process dies as a preempted VM does, with no chance to clean up.
KILL_STEP = 4
_KILL_DURING_WRITE = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity

for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
    original = cls.finalize

    async def finalize(self, _original=original):
        if self.get_final().name == "{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        return await _original(self)

    cls.finalize = finalize

from flax_d2v.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_usable(tmp_path):
    manifest = write_corpus(tmp_path / "data", 6)
    env = _env(1)
    argv = _argv("finetune", manifest, tmp_path / "run", 1)
    argv[argv.index("--save-every") + 1] = "2"
    ref_argv = _argv("finetune", manifest, tmp_path / "unbroken", 1)
    unbroken = subprocess.run(_cmd(ref_argv), capture_output=True, text=True, env=env, timeout=900)
    assert unbroken.returncode == 0, unbroken.stderr[-4000:]

    killed = subprocess.run(
        [sys.executable, "-c", _KILL_DURING_WRITE.replace("{step}", str(KILL_STEP)), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    run = tmp_path / "run"
    assert _checkpoints(run) == [KILL_STEP - 2]  # the half-written one is not a checkpoint
    assert any(str(KILL_STEP) in p.name for p in (run / "checkpoints").iterdir() if not p.name.isdigit())

    resumed = subprocess.run(_cmd(argv), capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"(step {KILL_STEP - 2})" in resumed.stderr
    assert not [p for p in (run / "checkpoints").iterdir() if not p.name.isdigit() and "tmp" in p.name]
    got, want = _losses(run), _losses(tmp_path / "unbroken")
    assert sorted(got) == list(range(1, STEPS + 1))
    later = list(range(KILL_STEP - 1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in later], [want[s] for s in later], rtol=RESUME_RTOL)
