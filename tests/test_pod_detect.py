"""Pods start without flags (issue 26): what `sharding.initialize_distributed` does with no
`--coordinator`, given the environment each platform sets. `jax.distributed.initialize` is replaced
by a recorder: these are the decisions, not a real cluster (none is reachable from here)."""

from __future__ import annotations

import jax
import pytest

from flax_d2v.errors import D2VError
from flax_d2v.train import sharding as S

# What the platforms set (values as seen on such machines; JAX's cluster classes read the same names).
GKE_TPU = {"TPU_WORKER_HOSTNAMES": "w-0.slice,w-1.slice,w-2.slice,w-3.slice", "TPU_WORKER_ID": "2"}
MULTISLICE = {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080", "MEGASCALE_NUM_SLICES": "2"}
SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NODELIST": "gpu[01-04]",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}
OPEN_MPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2"}


@pytest.fixture
def calls(monkeypatch):
    seen: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    return seen


def fake_pci(tmp_path, devices: dict[str, tuple[str, str]]) -> str:
    """A /sys/bus/pci/devices with the given (vendor, device) ids."""
    for name, (vendor, device) in devices.items():
        d = tmp_path / name
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
    return str(tmp_path)


@pytest.mark.parametrize(
    "env, found",
    [
        (GKE_TPU, "TPU slice on GKE (4 hosts"),
        (MULTISLICE, "TPU Multislice"),
        (SLURM, "SLURM job 4242 (4 tasks)"),
        (OPEN_MPI, "Open MPI job (2 ranks)"),
    ],
)
def test_platforms_start_without_flags(calls, tmp_path, capsys, env, found):
    assert S.initialize_distributed(environ=env, pci_devices=str(tmp_path)) is True
    assert calls == [{}]  # no arguments: JAX's own cluster detection finds the coordinator
    assert f"jax.distributed: {found}" in capsys.readouterr().err


def test_a_cloud_tpu_vm_is_recognised_from_its_pci_devices(calls, tmp_path):
    """A v4 host: 4 TPU chips (Google vendor id, v4 device id) beside a gVNIC (Google vendor, not a TPU)."""
    tpus = {f"0000:00:0{i}.0": (S.GOOGLE_PCI_VENDOR, "0x005e") for i in range(4, 8)}
    pci = fake_pci(tmp_path, {**tpus, "0000:00:03.0": (S.GOOGLE_PCI_VENDOR, "0x0042")})
    assert S.tpu_chips(pci) == 4
    assert S.detect_cluster({}, pci).startswith("Cloud TPU VM (4 chips")
    assert S.initialize_distributed(environ={}, pci_devices=pci) and calls == [{}]
    assert S.detect_cluster({"TPU_SKIP_MDS_QUERY": "1"}, pci) is None  # JAX's own switch for "not a TPU VM"


@pytest.mark.parametrize(
    "env",
    [
        {},  # a laptop or one GPU box
        {"TPU_WORKER_HOSTNAMES": "localhost"},  # a single-host slice on GKE
        {**SLURM, "SLURM_NTASKS": "1"},  # one SLURM task
        {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"},  # sbatch without srun: JAX cannot join it
        {**OPEN_MPI, "OMPI_COMM_WORLD_SIZE": "1"},
    ],
)
def test_one_process_is_left_alone(calls, tmp_path, env):
    pci = fake_pci(tmp_path, {"0000:00:03.0": (S.GOOGLE_PCI_VENDOR, "0x0042")})  # a GCE VM's gVNIC: no TPU
    assert S.initialize_distributed(environ=env, pci_devices=pci) is False
    assert calls == []


def test_explicit_flags_win_and_go_together(calls, tmp_path):
    assert S.initialize_distributed("host0:1234", 2, 1, environ=SLURM, pci_devices=str(tmp_path))
    assert calls == [{"coordinator_address": "host0:1234", "num_processes": 2, "process_id": 1}]
    with pytest.raises(D2VError, match="go together"):
        S.initialize_distributed("host0:1234", None, None, environ={}, pci_devices=str(tmp_path))
