"""The recipes (`flax_d2v.train.recipes`): flags generated from the fields, `--config run.json` for both
commands, the old `pretrain --config PRESET` spelling, and `train.finetune(FinetuneConfig(...))`."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from flax_d2v.commands import finetune as finetune_command
from flax_d2v.commands import pretrain as pretrain_command
from flax_d2v.errors import D2VError
from flax_d2v.train.recipes import FinetuneConfig, PretrainConfig

COMMANDS = {"finetune": (finetune_command, FinetuneConfig), "pretrain": (pretrain_command, PretrainConfig)}


def _parser(command):
    parser = argparse.ArgumentParser()
    COMMANDS[command][0].add_arguments(parser)
    return parser


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_field_has_a_flag_and_every_flag_a_field(command):
    parser = _parser(command)
    recipe = COMMANDS[command][1]
    fields = {f.name for f in dataclasses.fields(recipe)}
    dests = {}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        for flag in action.option_strings:
            dests[flag] = action.dest
    assert set(dests.values()) == fields
    for name in fields:
        flag = "--" + name.replace("_", "-")
        assert dests[flag] == name, flag
    hints = recipe.field_types()
    bools = {f.name for f in dataclasses.fields(recipe) if hints[f.name] in (bool, bool | None)}
    assert {d for f, d in dests.items() if f.startswith("--no-")} == bools
    # defaults in the namespace are the recipe's
    args = parser.parse_args([])
    for f in dataclasses.fields(recipe):
        assert getattr(args, f.name) == f.default, f.name


FLAGS = {
    "finetune": ["--train", "a.tsv", "--model", "tiny", "--out", "o", "--steps", "5", "--batch-size", "2"]
    + ["--learning-rate", "1e-4", "--mask-time-prob", "0.3", "--no-freeze-feature-encoder", "--bf16"]
    + ["--mesh", "data=1", "--eval-every", "2"],
    "pretrain": ["--train", "a.tsv", "--preset", "tiny", "--out", "o", "--steps", "5", "--batch-size", "2"]
    + ["--arch", "data2vec2", "--clone-batch", "2", "--no-inverse-mask", "--min-seconds", "1.5", "--dropout", "0.0"],
}


def _as_file_settings(argv):
    """The settings of a flag list as a run.json object (flag names without dashes; --no-x -> false)."""
    out, i = {}, 0
    while i < len(argv):
        name = argv[i][2:]
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[name] = argv[i + 1]
            i += 2
        else:
            out[name.removeprefix("no-")] = not name.startswith("no-")
            i += 1
    return out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_config_file_means_the_same_as_the_flags(command, tmp_path):
    module, _ = COMMANDS[command]
    parser = _parser(command)
    from_flags = module.resolve(parser.parse_args(FLAGS[command]))
    settings = _as_file_settings(FLAGS[command])
    parsed = vars(parser.parse_args(FLAGS[command]))
    typed = {k: parsed[k.replace("-", "_")] for k in settings}  # JSON numbers, not strings
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps(typed))
    from_file = module.resolve(parser.parse_args(["--config", str(run_json)]))
    assert from_file == from_flags
    if command == "pretrain":  # the run's own resolved settings: data2vec 2.0's defaults
        assert from_flags.resolved().lr_schedule == "cosine" and from_flags.resolved().mask_length == 5
    # flags given on the command line win over the file; the file fills the rest
    wins = module.resolve(parser.parse_args(["--config", str(run_json), "--steps", "9", "--seed", "0"]))
    assert wins == from_flags.replace(steps=9)
    run_json.write_text(json.dumps({**typed, "seed": 3}))
    assert module.resolve(parser.parse_args(["--config", str(run_json), "--seed", "0"])).seed == 0
    assert module.resolve(parser.parse_args(["--config", str(run_json)])).seed == 3
    # --preset on the command line replaces the file's model
    assert module.resolve(parser.parse_args(["--config", str(run_json), "--preset", "base"])).init_model == "base"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unknown_key_in_run_json_is_one_line(command, tmp_path, capsys):
    from flax_d2v.cli import main

    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({**_as_file_settings(FLAGS[command]), "learning_rat": 1}))
    assert main([command, "--config", str(run_json)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{run_json}: unknown key 'learning_rat'" in err


def test_pretrain_config_naming_the_model_still_works(tmp_path, capsys):
    """`d2v pretrain --config base` (the spelling before run.json files) names the model, with a note."""
    from flax_d2v.config import tiny_config

    parser = _parser("pretrain")
    base = ["--train", "a.tsv", "--out", "o", "--steps", "5", "--batch-size", "2"]
    cfg = pretrain_command.resolve(parser.parse_args([*base, "--config", "base"]))
    assert (cfg.preset, cfg.model) == ("base", None)
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "--preset base" in err
    model_json = tmp_path / "config.json"
    model_json.write_text(tiny_config().to_json_string())
    cfg = pretrain_command.resolve(parser.parse_args([*base, "--config", str(model_json)]))
    assert (cfg.preset, cfg.model) == (None, str(model_json))
    assert f"--model {model_json}" in capsys.readouterr().err
    with pytest.raises(D2VError, match="give one of them"):
        pretrain_command.resolve(parser.parse_args([*base, "--config", "base", "--preset", "tiny"]))
    with pytest.raises(D2VError, match="--model"):
        pretrain_command.resolve(parser.parse_args(base))


def test_mapping_settings_unknown_key_names_it():
    from flax_d2v import train

    with pytest.raises(D2VError, match="unknown key 'stepz'"):
        train.finetune({"train": "a.tsv", "model": "tiny", "out": "o", "stepz": 1})
    with pytest.raises(D2VError, match="unknown key 'stepz'"):
        train.pretrain({"train": "a.tsv", "preset": "tiny", "out": "o", "stepz": 1})


def test_train_finetune_runs_a_finetune_config(tmp_path):
    from synth_speech import write_corpus

    from flax_d2v import train
    from flax_d2v.train.metrics import read_metrics

    manifest = write_corpus(tmp_path / "data", 2)
    cfg = train.FinetuneConfig(
        train=str(manifest),
        preset="tiny",
        out=str(tmp_path / "run"),
        steps=2,
        batch_size=2,
        learning_rate=1e-4,
        log_every=1,
        progress=False,
        num_workers=0,  # in this process (worker processes: test_loader_workers, test_resume)
        async_checkpoint=False,
    )
    result = train.finetune(cfg)
    assert result.step == 2 and not result.stopped
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2]
    saved = json.loads((tmp_path / "run" / "finetune_config.json").read_text())
    assert saved["preset"] == "tiny" and saved["phase_ratio"] == "0.1,0.4,0.5"
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()
    # the run's settings file is a run.json: the same run again (resumes, nothing left to do)
    again = finetune_command.resolve({"config": str(tmp_path / "run" / "finetune_config.json")})
    assert again == cfg


def test_train_pretrain_runs_a_pretrain_config(tmp_path):
    from synth_speech import write_corpus

    from flax_d2v import train
    from flax_d2v.train.metrics import read_metrics

    manifest = write_corpus(tmp_path / "data", 2)
    cfg = train.PretrainConfig(
        train=str(manifest),
        preset="tiny",
        out=str(tmp_path / "run"),
        steps=2,
        batch_size=2,
        min_seconds=None,
        average_top_k_layers=2,
        log_every=1,
        progress=False,
        num_workers=0,  # in this process (worker processes: test_loader_workers, test_resume)
        async_checkpoint=False,
        export_hf=False,
    )
    result = train.pretrain(cfg)
    assert result.step == 2
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    saved = json.loads((tmp_path / "run" / "pretrain_config.json").read_text())
    assert (saved["learning_rate"], saved["lr_schedule"], saved["mask_length"]) == (5e-4, "tri_stage", 10)
