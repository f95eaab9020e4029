"""What the README promises the commands write (issue 14): `d2v verify --report` and `d2v demo` write
report.md + report.png and exit 1 when a stage is out of tolerance; `--tensorboard` writes event files
TensorBoard reads, with the logged metrics."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def tiny_ctc_dir(tmp_path_factory):
    """A transformers Data2VecAudioForCTC checkpoint (random weights, save_pretrained) with its tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conftest import tiny_hf_kwargs

    from flax_d2v.train import vocab as V

    d = tmp_path_factory.mktemp("tiny-ctc")
    torch.manual_seed(0)
    model = transformers.Data2VecAudioForCTC(transformers.Data2VecAudioConfig(**tiny_hf_kwargs(vocab_size=8)))
    model.eval().save_pretrained(d)
    V.save_tokenizer_files(d, {c: i for i, c in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|", "A", "B", "C"])})
    V.save_preprocessor_config(d)
    return d


def _fail_every_stage(monkeypatch):
    import flax_d2v.api.verify as verify_module

    # no error can be below -1: every stage fails, whatever the precision policy's tolerance
    monkeypatch.setattr(verify_module, "TOLERANCES", {k: -1.0 for k in verify_module.TOLERANCES})


def _check_report(md, png):
    text = md.read_text()
    assert text.startswith("# data2vec-audio parity report") and "- result: **" in text
    assert sum(line.startswith("|") for line in text.splitlines()) >= 6  # the table: header + a row per stage
    assert f"]({png.name})" in text  # the report embeds its plot
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_verify_writes_report_and_exits_1_on_a_failed_stage(tiny_ctc_dir, tmp_path, monkeypatch, capsys):
    from flax_d2v.cli import main

    md = tmp_path / "parity" / "report.md"
    assert main(["verify", str(tiny_ctc_dir), "--report", str(md), "--no-batch"]) == 0
    _check_report(md, md.with_suffix(".png"))
    assert "PASS" in capsys.readouterr().out and "- result: **PASS**" in md.read_text()

    _fail_every_stage(monkeypatch)
    md2 = tmp_path / "failed" / "report.md"
    assert main(["verify", str(tiny_ctc_dir), "--report", str(md2), "--no-batch"]) == 1
    _check_report(md2, md2.with_suffix(".png"))  # written all the same, saying what failed
    assert "- result: **FAIL**" in md2.read_text() and "FAIL" in capsys.readouterr().out


def test_demo_writes_its_report_and_exits_1_on_a_failed_stage(tiny_ctc_dir, tmp_path, monkeypatch, capsys):
    from flax_d2v.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--model", str(tiny_ctc_dir), "--out", str(out)]) == 0
    _check_report(out / "report.md", out / "report.png")
    assert (out / "flax" / "config.json").is_file()
    printed = capsys.readouterr().out
    assert "[4/5] transcribing" in printed and "[5/5] training parity: 3 ctc updates" in printed
    assert "- result: **PASS**" in (out / "train_report.md").read_text()

    _fail_every_stage(monkeypatch)
    from flax_d2v.train import verify_train

    monkeypatch.setitem(verify_train.TOLERANCES, "highest", {"loss": 0.0, "grad": 0.0, "param": 0.0})
    monkeypatch.setattr(verify_train, "FLOOR_FACTOR", 0.0)  # nor any allowance for PyTorch's own fp32 error
    out2 = tmp_path / "demo-failed"
    assert main(["demo", "--model", str(tiny_ctc_dir), "--out", str(out2)]) == 1
    _check_report(out2 / "report.md", out2 / "report.png")
    assert "- result: **FAIL**" in (out2 / "report.md").read_text()
    assert "- result: **FAIL**" in (out2 / "train_report.md").read_text()


def test_tensorboard_writes_the_logged_metrics(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from synth_speech import write_corpus

    from flax_d2v.commands.finetune import resolve
    from flax_d2v.train import finetune

    manifest = write_corpus(tmp_path / "data", 2)
    run = tmp_path / "run"
    finetune(
        resolve(
            dict(
                train=str(manifest),
                model="tiny",
                out=str(run),
                steps=2,
                batch_size=2,
                learning_rate=1e-4,
                log_every=1,
                progress=False,
                export_hf=False,
                num_workers=1,
                tensorboard=True,
            )
        )
    )
    events = sorted((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list((run / "tensorboard").iterdir())
    seen: dict[str, dict[int, float]] = {}
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                assert value.metadata.plugin_data.plugin_name == "scalars"  # what TensorBoard's scalar plugin reads
                seen.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for tag in ("loss", "lr", "grad_norm"):
        assert seen[tag] == pytest.approx({r["step"]: r[tag] for r in rows if tag in r}, rel=1e-6), tag
