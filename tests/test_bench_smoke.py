"""The benchmark scripts run end to end on a tiny model and write the result they promise.

Timings are never asserted (the machine is shared); what is checked is that both sides ran,
computed the same thing (output difference, eval-loss agreement) and that every reported field
is present in the JSON.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Both sides compute the same tiny fp32 model; they differ only by summation order.
FORWARD_ATOL = 1e-4
LOSS_RTOL = 1e-4


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_env(speech_dir, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch.setenv("D2V_SHARED_SPEECH", str(speech_dir))


def _timing_keys(side: dict) -> None:
    for key in (
        "median_s",
        "min_s",
        "iqr_s",
        "x_real_time",
        "gflops_per_s",
        "fraction_of_matmul_peak",
        "first_call_s",
        "peak_rss_growth_bytes",
    ):
        assert key in side, key
    assert side["median_s"] > 0 and math.isfinite(side["gflops_per_s"])


def test_infer_smoke(bench_env, tmp_path):
    infer = _load("infer")
    out = tmp_path / "infer.json"
    assert (
        infer.main(
            [
                "--size",
                "tiny",
                "--cases",
                "1x1,2x0.5",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--peak-sizes",
                "128",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["machine"]["versions"]["jax"] and result["matmul_peak"]["gflops"] > 0
    assert [(c["batch"], c["seconds"]) for c in result["cases"]] == [(1, 1.0), (2, 0.5)]
    for case in result["cases"]:
        _timing_keys(case["flax"])
        _timing_keys(case["pytorch"])
        assert case["flax"]["compile_s"] > 0 and case["analytic_flops"]["total"] > 0
        assert case["speedup_flax_over_pytorch"] > 0
        assert case["max_abs_diff"] < FORWARD_ATOL * max(1.0, case["ref_max_abs"])
    assert infer.format_row(result["cases"][0])[0] == "1 x 1"


def test_train_smoke(bench_env, tmp_path):
    train = _load("train")
    out = tmp_path / "train.json"
    assert (
        train.main(
            [
                "--size",
                "tiny",
                "--batch",
                "2",
                "--seconds",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--peak-sizes",
                "128",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    _timing_keys(result["flax"])
    _timing_keys(result["pytorch"])
    assert result["eval_loss_rel_diff"] < LOSS_RTOL
    assert result["analytic_flops"]["total"] > result["analytic_flops"]["forward"] > 0
    assert min(result["label_lengths"]) > 0


def test_analytic_flops_base():
    """The base forward is about 14.2 GFLOP per second of audio at 5 s (the issue's figure)."""
    common = _load("common")
    from flax_d2v.config import base_config

    per_second = common.forward_flops(base_config(), 1, 5 * 16000)["total"] / 5 / 1e9
    assert per_second == pytest.approx(14.2, abs=0.1)


def test_pretrain_v2_smoke(speech_dir, monkeypatch, tmp_path):
    """bench/pretrain_v2.py: one update of each objective, both sides' numbers in the JSON."""
    monkeypatch.setenv("D2V_SHARED_SPEECH", str(speech_dir))
    bench = _load("pretrain_v2")
    out = tmp_path / "pt.json"
    assert (
        bench.main(
            [
                "--size",
                "tiny",
                "--batch",
                "2",
                "--seconds",
                "1",
                "--clone-batch",
                "2",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    for arch in ("data2vec", "data2vec2"):
        side = result["cases"][arch]
        assert side["median_s"] > 0 and side["updates_per_s"] > 0 and side["audio_s_per_s"] > 0
    assert result["v1_over_v2_time"] > 0
