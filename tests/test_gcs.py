"""Object-store URLs (`gs://`) for every path a command takes, against a real GCS server (issue 26).

The server is `gcp-storage-emulator` in this process (`gcs_emulator.py`); the commands run in
subprocesses whose environment points gcsfs, tensorstore and etils.epath at it before they import.
The emulator ignores generation preconditions: these tests check single-writer behaviour only.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gcs_emulator import PRIVATE_BUCKET, READ_ONLY_BUCKET, serve
from synth_speech import write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gcs():
    yield from serve()


# Runs `d2v` commands one after the other in one process (one start-up of JAX for all of them) and
# prints each one's exit status, so a test sees every command's output and status.
_DRIVER = """
import json, sys
from flax_d2v.cli import main
for argv in json.loads(sys.argv[1]):
    print("=== d2v " + " ".join(argv), file=sys.stderr, flush=True)
    rc = main(argv)
    print(f"=== rc {rc}", file=sys.stderr, flush=True)
"""


def client_env(gcs, devices: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(gcs.env, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_commands(gcs, commands: list[list[str]], timeout: int = 600) -> list[tuple[int, str]]:
    """(exit status, stderr) of each `d2v` command, run in one subprocess against the emulator."""
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(commands)],
        capture_output=True,
        text=True,
        env=client_env(gcs),
        timeout=timeout,
        cwd=REPO,
    )
    parts = proc.stderr.split("=== d2v ")[1:]
    assert len(parts) == len(commands), proc.stderr[-4000:]
    out = []
    for part in parts:
        body, _, tail = part.rpartition("=== rc ")
        out.append((int(tail.split()[0]), body.split("\n", 1)[1] if "\n" in body else ""))
    out[-1] = (out[-1][0], out[-1][1] + "\n[stdout]\n" + proc.stdout)
    return out


def tiny_hf_ctc(directory: Path) -> Path:
    """A tiny random transformers CTC directory with its processor files."""
    from flax_d2v import Data2VecAudioForCTC, init_params, tiny_config
    from flax_d2v.convert.hf import save_hf
    from flax_d2v.processor import save_preprocessor_config, save_tokenizer_files
    from flax_d2v.train.vocab import build_vocab

    vocab = build_vocab(["ten of clubs go forward"])
    module = Data2VecAudioForCTC(tiny_config(vocab_size=len(vocab)))
    files = directory / "files"
    save_tokenizer_files(files, vocab)
    save_preprocessor_config(files)
    return save_hf(directory / "hf", module.config, init_params(module, 0), files_from=files)


def flac_bytes(wav: Path) -> bytes:
    import soundfile as sf

    data, sr = sf.read(wav, dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="FLAC")
    return buf.getvalue()


@pytest.mark.slow
def test_convert_both_ways_and_transcribe_in_the_bucket(gcs, tmp_path):
    """`d2v convert gs://…/hf gs://…/flax`, back with `--to hf`, and `d2v transcribe gs://…/clip.flac`
    with the model in the bucket: the same weights and the same transcript as from local files."""
    from safetensors.numpy import load

    b = gcs.bucket
    hf = tiny_hf_ctc(tmp_path)
    b.put_tree(hf, "t1/hf")
    clip = write_corpus(tmp_path / "audio", 1).parent / "clip000.wav"
    (tmp_path / "clip.flac").write_bytes(flac_bytes(clip))
    b.put("t1/clip.flac", (tmp_path / "clip.flac").read_bytes())
    results = run_commands(
        gcs,
        [
            ["convert", b.url("t1/hf"), b.url("t1/flax")],
            ["convert", b.url("t1/flax"), b.url("t1/hf2"), "--to", "hf"],
            ["convert", str(hf), str(tmp_path / "flax")],
            ["transcribe", "--model", b.url("t1/flax"), "--json", b.url("t1/clip.flac")],
            ["transcribe", "--model", str(tmp_path / "flax"), "--json", str(tmp_path / "clip.flac")],
        ],
    )
    for rc, err in results:
        assert rc == 0, err[-3000:]
    keys = b.keys("t1/")
    assert "t1/flax/flax_model.safetensors" in keys and "t1/flax/vocab.json" in keys, keys
    assert not [k for k in keys if "tmp" in k or "write-check" in k], keys
    assert (
        load(b.get("t1/flax/flax_model.safetensors")).keys()
        == load((tmp_path / "flax" / "flax_model.safetensors").read_bytes()).keys()
    )
    back, orig = load(b.get("t1/hf2/model.safetensors")), load((hf / "model.safetensors").read_bytes())
    assert back.keys() == orig.keys()
    for k in orig:
        np.testing.assert_array_equal(back[k], orig[k], err_msg=k)
    stdout = results[-1][1].split("[stdout]\n", 1)[1]
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [r["path"] for r in lines] == [b.url("t1/clip.flac"), str(tmp_path / "clip.flac")]
    assert lines[0]["text"] == lines[1]["text"]


def test_bad_urls_fail_in_one_line_naming_them(gcs, tmp_path):
    """No credentials, a missing bucket, a missing object, a bucket that refuses writes: one line each."""
    b = gcs.bucket
    hf = tiny_hf_ctc(tmp_path)
    manifest = write_corpus(tmp_path / "data", 2)
    private = f"gs://{PRIVATE_BUCKET}/clips.tsv"
    no_bucket = "gs://no-such-bucket-d2v/clips.tsv"
    missing = b.url("nothing/here.tsv")
    read_only = f"gs://{READ_ONLY_BUCKET}/run"
    finetune = ["finetune", "--model", "tiny", "--steps", "1", "--batch-size", "1", "--learning-rate", "1e-3"]
    results = run_commands(
        gcs,
        [
            [*finetune, "--train", private, "--out", str(tmp_path / "r1")],
            [*finetune, "--train", no_bucket, "--out", str(tmp_path / "r2")],
            [*finetune, "--train", missing, "--out", str(tmp_path / "r3")],
            [*finetune, "--train", str(manifest), "--out", read_only],
            ["convert", str(hf), f"gs://{READ_ONLY_BUCKET}/flax"],
            ["convert", f"gs://{PRIVATE_BUCKET}/hf", str(tmp_path / "x")],
            ["transcribe", "--model", str(hf), "gs://no-such-bucket-d2v/clip.flac", b.url("missing.flac")],
        ],
    )
    want = [
        (private, "no credentials for gs://"),
        (no_bucket, "no such bucket 'no-such-bucket-d2v'"),
        (missing, "no such file or object"),
        (read_only, "the bucket refuses writes"),
        (f"gs://{READ_ONLY_BUCKET}/flax", "the bucket refuses writes"),
        (f"gs://{PRIVATE_BUCKET}/hf", "no credentials for gs://"),
    ]
    for (rc, err), (url, words) in zip(results, want, strict=False):
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[stdout]")]
        errors = [line for line in lines if "error:" in line]
        assert rc == 1 and len(errors) == 1, err[-3000:]
        assert url in errors[0] and words in errors[0], errors[0]
        assert "Traceback" not in err, err[-3000:]
    rc, err = results[-1]
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    assert "gs://no-such-bucket-d2v/clip.flac: no such bucket 'no-such-bucket-d2v'" in err, err
    assert f"{b.url('missing.flac')}: no such file or object" in err, err


# ---------------------------------------------------------------------------------------- runs in the bucket
RESUME_RTOL = 1e-6  # as tests/test_resume.py: the same program on the same inputs after an exact restore
STEPS = 10  # 3 batches per epoch (6 clips, batch 2): the kill lands mid-epoch
KILL_AFTER = 3  # SIGTERM once the bucket's metrics.jsonl holds this many rows (it is written at each checkpoint)


def upload_corpus(b, tmp_path: Path, key: str, clips: int, text: bool = True) -> str:
    """A synthetic corpus in the bucket: the clips and a manifest listing them by *relative* path."""
    manifest = write_corpus(tmp_path / key, clips, text=text)
    rows = manifest.read_text().splitlines()
    relative = [rows[0]] + ["\t".join([Path(r.split("\t")[0]).name, *r.split("\t")[1:]]) for r in rows[1:]]
    for p in sorted(manifest.parent.glob("*.wav")):
        b.put(f"{key}/audio/{p.name}", p.read_bytes())
    return b.put(f"{key}/audio/clips.tsv", ("\n".join(relative) + "\n").encode())


def finetune_argv(manifest: str, out: str, steps: int = STEPS, batch: int = 2, mesh: str | None = None) -> list[str]:
    argv = ["finetune", "--train", manifest, "--out", out, "--steps", str(steps), "--batch-size", str(batch)]
    argv += ["--seed", "3", "--save-every", "2", "--log-every", "1", "--no-progress", "--num-workers", "1"]
    argv += ["--model", "tiny", "--learning-rate", "1e-3", "--dropout", "0.1", "--mask-time-prob", "0.3"]
    argv += ["--mask-time-length", "2", "--mask-feature-prob", "0.2", "--mask-feature-length", "4"]
    return argv + (["--mesh", mesh] if mesh else [])


def metrics_rows(data: bytes | None) -> list[dict]:
    return [json.loads(line) for line in (data or b"").decode().splitlines() if line.strip()]


def losses(rows: list[dict]) -> dict[int, float]:
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)), steps  # no duplicate, no reordering
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def sigterm_when(argv: list[str], env: dict, ready) -> str:
    """Start `d2v ARGV`, SIGTERM it once `ready()`; its output."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "flax_d2v.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        deadline = time.time() + 600
        while not ready():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "no progress after 600 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)  # freeze it at once, so the SIGTERM lands well before the last update
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert "received SIGTERM" in out, out[-4000:]
    return out


def run_cli(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "flax_d2v.cli", *argv], capture_output=True, text=True, env=env, timeout=900, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_finetune_in_the_bucket_sigterm_then_resume_logs_the_unbroken_losses(gcs, tmp_path):
    """Manifest, audio and --out in the bucket: SIGTERM mid-run, the same command resumes from the bucket
    and logs the losses of an unbroken run on local files; RUN/hf, the settings, the vocabulary, the plot
    and metrics.jsonl (no row twice) end up in the bucket, no temporary object is left."""
    b = gcs.bucket
    manifest = upload_corpus(b, tmp_path, "t2", 6)
    env = client_env(gcs)
    local = write_corpus(tmp_path / "local", 6)  # the same bytes, on disk
    unbroken = run_cli(finetune_argv(str(local), str(tmp_path / "unbroken")), env)
    assert '"batches_per_epoch": 3' in unbroken.stderr
    want = losses(metrics_rows((tmp_path / "unbroken" / "metrics.jsonl").read_bytes()))
    assert sorted(want) == list(range(1, STEPS + 1))

    argv = finetune_argv(manifest, b.url("t2/run"))
    out = sigterm_when(argv, env, lambda: len(metrics_rows(b.get("t2/run/metrics.jsonl"))) >= KILL_AFTER)
    stopped = max(int(k.split("/")[3]) for k in b.keys("t2/run/checkpoints/") if k.split("/")[3].isdigit())
    assert KILL_AFTER <= stopped < STEPS, (stopped, out[-2000:])
    # what a preemption leaves: every row up to the checkpoint it saved, none after
    assert sorted(losses(metrics_rows(b.get("t2/run/metrics.jsonl")))) == list(range(1, stopped + 1))

    resumed = run_cli(argv, env)
    assert f"(step {stopped})" in resumed.stderr, resumed.stderr[-3000:]
    got = losses(metrics_rows(b.get("t2/run/metrics.jsonl")))
    assert sorted(got) == list(range(1, STEPS + 1))
    steps = list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=RESUME_RTOL)
    keys = b.keys("t2/run/")
    for name in ("finetune_config.json", "vocab.json", "training_curves.png", "hf/model.safetensors", "hf/vocab.json"):
        assert f"t2/run/{name}" in keys, (name, keys)
    assert not [k for k in keys if "write-check" in k or ".tmp" in k or "-files-" in k], keys
