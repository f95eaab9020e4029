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


@pytest.mark.slow
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
SAVE_EVERY = 3  # few checkpoints: each is many requests to the emulator
KILL_AFTER = 3  # SIGTERM once the bucket's metrics.jsonl holds this many rows (it is written at each checkpoint)


def upload_corpus(b, tmp_path: Path, key: str, clips: int, text: bool = True) -> str:
    """A synthetic corpus in the bucket: the clips and a manifest listing them by *relative* path."""
    manifest = write_corpus(tmp_path / key, clips, text=text)
    rows = manifest.read_text().splitlines()
    relative = [rows[0]] + ["\t".join([Path(r.split("\t")[0]).name, *r.split("\t")[1:]]) for r in rows[1:]]
    for p in sorted(manifest.parent.glob("*.wav")):
        b.put(f"{key}/audio/{p.name}", p.read_bytes())
    return b.put(f"{key}/audio/clips.tsv", ("\n".join(relative) + "\n").encode())


def finetune_argv(
    manifest: str, out: str, steps: int = STEPS, batch: int = 2, mesh: str | None = None, save_every: int = 2
) -> list[str]:
    argv = ["finetune", "--train", manifest, "--out", out, "--steps", str(steps), "--batch-size", str(batch)]
    argv += ["--seed", "3", "--save-every", str(save_every), "--log-every", "1", "--no-progress"]
    argv += ["--num-workers", "1"]
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
    # the three runs compile the same programs: the first one's, read back by the others, keep this test short
    env = {**client_env(gcs), "D2V_COMPILATION_CACHE": str(tmp_path / "compiled")}
    local = write_corpus(tmp_path / "local", 6)  # the same bytes, on disk
    unbroken = run_cli(finetune_argv(str(local), str(tmp_path / "unbroken"), save_every=SAVE_EVERY), env)
    assert '"batches_per_epoch": 3' in unbroken.stderr
    want = losses(metrics_rows((tmp_path / "unbroken" / "metrics.jsonl").read_bytes()))
    assert sorted(want) == list(range(1, STEPS + 1))

    argv = finetune_argv(manifest, b.url("t2/run"), save_every=SAVE_EVERY)
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


# ---------------------------------------------------------------------------------------- elastic resume
# The bar for a run continued on another mesh: the same global batch, data order and
# per-example randomness, so only the order of floating-point reductions changes (measured here:
# at most 7.2e-8 relative over 10 steps, for every mesh of the test).
ELASTIC_RTOL = 1e-5
ELASTIC_STEPS = 10


def elastic_env(gcs, devices: int) -> dict[str, str]:
    return client_env(gcs, devices)


def copy_prefix(b, src: str, dst: str) -> None:
    for key in b.keys(src + "/"):
        b.put(dst + key[len(src) :], b.get(key))


def checkpoint_steps(b, run: str) -> list[int]:
    parts = [k[len(run) + 1 :].split("/") for k in b.keys(run + "/checkpoints/")]
    return sorted({int(p[1]) for p in parts if len(p) > 2 and p[1].isdigit()})


@pytest.mark.slow
def test_elastic_resume_from_8_devices_on_4_then_1_keeps_the_losses(gcs, tmp_path):
    """A run checkpointed in the bucket on `--mesh data=8` continues on 4 devices (fsdp=4, data=4,
    data=2,fsdp=2) and then on one device: one line says the mesh changed, the losses stay within
    ELASTIC_RTOL of the unbroken 8-device run, and a changed global batch size is still refused."""
    b = gcs.bucket
    manifest = upload_corpus(b, tmp_path, "el", 24)  # 3 batches of 8 per epoch
    argv = lambda out, mesh: finetune_argv(manifest, out, steps=ELASTIC_STEPS, batch=8, mesh=mesh)
    unbroken = run_cli(argv(str(tmp_path / "unbroken"), "data=8"), elastic_env(gcs, 8))
    assert '"batches_per_epoch": 3' in unbroken.stderr
    want = losses(metrics_rows((tmp_path / "unbroken" / "metrics.jsonl").read_bytes()))

    run = "el/run"
    rows = lambda key: len(metrics_rows(b.get(f"{key}/metrics.jsonl")))
    sigterm_when(argv(b.url(run), "data=8"), elastic_env(gcs, 8), lambda: rows(run) >= 3)
    first = checkpoint_steps(b, run)[-1]
    for other in ("el/data4", "el/data2fsdp2"):
        copy_prefix(b, run, other)

    refused = subprocess.run(
        [sys.executable, "-m", "flax_d2v.cli", *finetune_argv(manifest, b.url(run), ELASTIC_STEPS, 4, "fsdp=4")],
        capture_output=True,
        text=True,
        env=elastic_env(gcs, 4),
        timeout=900,
        cwd=REPO,
    )
    assert refused.returncode == 1 and "--batch-size 8" in refused.stderr, refused.stderr[-3000:]

    out = sigterm_when(argv(b.url(run), "fsdp=4"), elastic_env(gcs, 4), lambda: rows(run) >= first + 2)
    assert "mesh changed: the checkpoint was written on data=8 (8 devices), this run has fsdp=4" in out, out[-3000:]
    second = checkpoint_steps(b, run)[-1]
    assert first < second < ELASTIC_STEPS, (first, second)
    last = run_cli(argv(b.url(run), None), elastic_env(gcs, 1))
    assert "mesh changed: the checkpoint was written on fsdp=4 (4 devices), this run has 1 device" in last.stderr
    got = {"fsdp=4 then 1 device": losses(metrics_rows(b.get(f"{run}/metrics.jsonl")))}
    for key, mesh in (("el/data4", "data=4"), ("el/data2fsdp2", "data=2,fsdp=2")):
        resumed = run_cli(argv(b.url(key), mesh), elastic_env(gcs, 4))
        assert f"(step {first})" in resumed.stderr and "mesh changed" in resumed.stderr, resumed.stderr[-3000:]
        got[mesh] = losses(metrics_rows(b.get(f"{key}/metrics.jsonl")))
    steps = list(range(1, ELASTIC_STEPS + 1))
    worst = {}
    for name, g in got.items():
        assert sorted(g) == steps, (name, sorted(g))
        rel = [abs(g[s] - want[s]) / abs(want[s]) for s in steps]
        worst[name] = max(rel)
        np.testing.assert_allclose([g[s] for s in steps], [want[s] for s in steps], rtol=ELASTIC_RTOL, err_msg=name)
    print(f"elastic resume: largest relative loss difference from the unbroken run: {worst}")


@pytest.mark.slow
def test_two_processes_of_4_devices_write_one_checkpoint_to_the_bucket(gcs, tmp_path):
    """`d2v finetune --out gs://...` on 2 processes x 4 devices joined by jax.distributed: every process
    writes its shards of the same checkpoint; the losses are the 8-device single-process run's, and one
    process on one device reads that checkpoint back."""
    import socket

    b = gcs.bucket
    manifest = upload_corpus(b, tmp_path, "mh", 24)
    steps = 4
    argv = lambda out, mesh: finetune_argv(manifest, out, steps=steps, batch=8, mesh=mesh)
    run_cli(argv(str(tmp_path / "one"), "data=8"), elastic_env(gcs, 8))
    want = losses(metrics_rows((tmp_path / "one" / "metrics.jsonl").read_bytes()))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flax_d2v.cli", *argv(b.url("mh/run"), "data=8"), *flags, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=elastic_env(gcs, 4),
            cwd=REPO,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=900))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    keys = b.keys(f"mh/run/checkpoints/{steps}/")
    for i in range(2):
        assert any(f"/ocdbt.process_{i}/" in k for k in keys), keys  # each process wrote its shards
    assert f"mh/run/checkpoints/{steps}/commit_success.txt" in keys or any("commit_success" in k for k in keys), keys
    got = losses(metrics_rows(b.get("mh/run/metrics.jsonl")))
    assert sorted(got) == list(range(1, steps + 1))
    s = list(range(1, steps + 1))
    np.testing.assert_allclose([got[k] for k in s], [want[k] for k in s], rtol=ELASTIC_RTOL)
    assert "mh/run/hf/model.safetensors" in b.keys("mh/run/hf/")
    back = run_cli(argv(b.url("mh/run"), None), elastic_env(gcs, 1))
    assert f"(step {steps})" in back.stderr and "mesh changed" in back.stderr, back.stderr[-3000:]


PRETRAIN_STEPS = 10


def pretrain_argv(manifest: str, out: str) -> list[str]:
    argv = ["pretrain", "--train", manifest, "--out", out, "--steps", str(PRETRAIN_STEPS), "--batch-size", "2"]
    argv += ["--seed", "3", "--save-every", "2", "--log-every", "1", "--no-progress", "--num-workers", "1"]
    argv += ["--config", "tiny", "--average-top-k-layers", "2", "--mask-length", "3", "--ema-decay", "0.9"]
    return argv + ["--ema-end-decay", "0.99", "--ema-anneal-end-step", "10", "--min-seconds", "0", "--tensorboard"]


@pytest.mark.slow
def test_pretrain_in_the_bucket_sigterm_then_resume_logs_the_unbroken_losses(gcs, tmp_path):
    """`d2v pretrain` (EMA teacher) likewise: SIGTERM, resume from the bucket, the unbroken run's losses;
    RUN/hf, RUN/flax and the TensorBoard event files in the bucket."""
    b = gcs.bucket
    manifest = upload_corpus(b, tmp_path, "pt", 6, text=False)
    env = client_env(gcs)
    local = write_corpus(tmp_path / "local", 6, text=False)
    run_cli(pretrain_argv(str(local), str(tmp_path / "unbroken")), env)
    want = losses(metrics_rows((tmp_path / "unbroken" / "metrics.jsonl").read_bytes()))
    argv = pretrain_argv(manifest, b.url("pt/run"))
    sigterm_when(argv, env, lambda: len(metrics_rows(b.get("pt/run/metrics.jsonl"))) >= KILL_AFTER)
    stopped = checkpoint_steps(b, "pt/run")[-1]
    assert KILL_AFTER <= stopped < PRETRAIN_STEPS, stopped
    resumed = run_cli(argv, env)
    assert f"(step {stopped})" in resumed.stderr, resumed.stderr[-3000:]
    got = losses(metrics_rows(b.get("pt/run/metrics.jsonl")))
    s = list(range(1, PRETRAIN_STEPS + 1))
    assert sorted(got) == s
    np.testing.assert_allclose([got[k] for k in s], [want[k] for k in s], rtol=RESUME_RTOL)
    keys = b.keys("pt/run/")
    for name in ("pretrain_config.json", "hf/model.safetensors", "flax/flax_model.safetensors", "training_curves.png"):
        assert f"pt/run/{name}" in keys, (name, keys)
    assert [k for k in keys if k.startswith("pt/run/tensorboard/events.out.tfevents")], keys


@pytest.mark.slow
def test_bench_gcs_read_reports_both_paths(speech_dir, tmp_path):
    """bench/gcs_read.py runs end to end and reports both read paths (timings are not asserted)."""
    out = tmp_path / "gcs_read.json"
    env = {**os.environ, "D2V_SHARED_SPEECH": str(speech_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gcs_read.py"), "--repeats", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["local"]["audio_s"] == report["gcs_emulator"]["audio_s"] > 0
    assert report["gcs_emulator"]["audio_s_per_s"] > 0 and report["bucket_over_local"] > 0
