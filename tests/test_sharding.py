"""Scale-out (issue 8): one step, any layout. Multi-device checks run in subprocesses with fake CPU devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from flax_d2v.errors import D2VError
from flax_d2v.train import sharding as S

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import write_manifest  # noqa: E402

WORKER = Path(__file__).parent / "multihost_worker.py"
CLIPS = (
    "cards_001",
    "goforward",
    "cards_003",
    "forever",
    "cards_002",
    "cards_004",
    "slt_arctic_a0009",
    "librivox_0880",
)
# Same math, different reduction trees (all-reduce vs local sums): the bar.
LAYOUT_RTOL = 1e-4
# fsdp=8 shards everything but step counters, the 32-wide lm_head bias and other vectors not divisible by 8.
FSDP_BYTES_SLACK = 1.1


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return env


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, stdout
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def manifest(speech_dir, tmp_path_factory):
    return write_manifest(speech_dir, CLIPS, tmp_path_factory.mktemp("shard") / "eight.tsv")


@pytest.fixture(scope="module")
def layouts(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    proc = subprocess.run(
        [sys.executable, str(WORKER), "layouts", "--manifest", str(manifest), "--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(8),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _result(proc.stdout), proc.stderr


def test_losses_agree_across_layouts(layouts):
    """Dropout, LayerDrop and SpecAugment on (multihost_worker.DROPOUT): the same losses on every layout."""
    report, _ = layouts
    ref = report["losses"]["one"]
    assert len(ref) == 3 and all(np.isfinite(ref))
    for name in ("data=8", "fsdp=8", "data=2,fsdp=4", "pmap"):
        np.testing.assert_allclose(report["losses"][name], ref, rtol=LAYOUT_RTOL, err_msg=name)


def test_fsdp_shards_params_and_optimizer_state(layouts):
    report, log = layouts
    ratio = report["bytes_fsdp8_per_device"] / report["bytes_one_device"]
    assert ratio <= FSDP_BYTES_SLACK / 8, ratio
    assert "params+opt bytes: one device" in log  # measured from the shardings and printed


def test_checkpoint_restores_across_meshes(layouts):
    report, _ = layouts
    for name, devices in (("data=8", 8), ("one", 1)):
        r = report["restore"][name]
        assert r["step"] == 3 and r["equal"] and r["devices"] == devices, r


def test_two_processes_agree_with_one_device(manifest, layouts, tmp_path):
    report, _ = layouts
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "process",
                "--manifest",
                str(manifest),
                "--out",
                str(tmp_path / "run"),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(4),
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    result = _result(outs[0][0])
    assert result["process_count"] == 2 and result["devices"] == 8
    np.testing.assert_allclose(result["losses"], report["losses"]["one"], rtol=LAYOUT_RTOL)


# ----------------------------------------------------------------------------------- in-process units
def test_parse_mesh():
    assert S.parse_mesh("data=2,fsdp=4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert S.parse_mesh("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert S.parse_mesh(None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(D2VError, match="multiply to 4"):
        S.parse_mesh("data=2,fsdp=2", 8)
    with pytest.raises(D2VError, match="--mesh"):
        S.parse_mesh("model=8", 8)


def test_logical_rules_map_params_to_fsdp():
    from flax_d2v.config import tiny_config
    from flax_d2v.modeling import Data2VecAudioForCTC, logical_axes, param_shapes

    module = Data2VecAudioForCTC(tiny_config())
    axes = logical_axes(module)
    mesh = S.make_mesh(None, devices=jax.devices()[:1])
    shardings = S.logical_to_mesh(axes, param_shapes(module), mesh)
    spec = shardings["data2vec_audio"]["encoder"]["layers_0"]["feed_forward"]["intermediate_dense"]["kernel"].spec
    assert spec == P(None, None)  # one device: every axis of size 1 is dropped
    mesh_specs = jax.tree.map(
        lambda s: s,
        __import__("flax").linen.logical_to_mesh(axes, S.LOGICAL_AXIS_RULES),
        is_leaf=lambda x: isinstance(x, P),
    )
    assert mesh_specs["data2vec_audio"]["encoder"]["layers_0"]["feed_forward"]["intermediate_dense"]["kernel"] == P(
        "fsdp", "tensor"
    )
    assert mesh_specs["lm_head"]["kernel"] == P("fsdp", None)
