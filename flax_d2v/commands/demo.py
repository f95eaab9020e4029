"""d2v demo: the whole foundation on an embedded default, with no download.

With no arguments it builds a data2vec-audio-base CTC checkpoint in the real transformers format
(random weights through `save_pretrained`, since no hub is reachable here; the vocabulary is
facebook/data2vec-audio-base-960h's), converts it to Flax, verifies the Flax model layer by layer
against PyTorch on the bundled real speech clip, prints the report, transcribes the clip with
the Flax model (random weights: the text is noise, the path is real), runs a few fine-tuning
steps of `d2v finetune` against transformers + torch.optim.AdamW (`d2v verify --train`) and says
where everything went. `--model` takes a real checkpoint (HF dir, hub id, or fairseq .pt) instead.
Either parity check outside its tolerance fails the demo.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flax_d2v.api.pretrained import load_any
from flax_d2v.api.transcribe import transcribe
from flax_d2v.api.verify import default_clip, format_table, markdown_report, plot_errors, verify
from flax_d2v.checkpoint import save_flax
from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_dir, atomic_write_text
from flax_d2v.precision import add_argument as add_precision_argument
from flax_d2v.processor import save_preprocessor_config, save_tokenizer_files
from flax_d2v.train import verify_train as vt

# The training stage: a few updates of two micro-batches of one clip each (the clip and a crop of it), at
# base size within about a minute on 2 CPU cores; `d2v verify --train` runs 20 updates of 4 clips.
DEMO_TRAIN_STEPS = 3
DEMO_TRAIN_RECIPE = {"batch_size": 2}

# facebook/data2vec-audio-base-960h's vocab.json (character CTC vocabulary, <pad> = blank = 0).
BASE_960H_VOCAB = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "|",
    "E",
    "T",
    "A",
    "O",
    "N",
    "I",
    "H",
    "S",
    "R",
    "D",
    "L",
    "U",
    "M",
    "W",
    "C",
    "F",
    "G",
    "Y",
    "P",
    "B",
    "V",
    "K",
    "'",
    "X",
    "J",
    "Q",
    "Z",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="a real checkpoint instead of the locally built base model (HF dir, hub id, fairseq .pt)",
    )
    p.add_argument("--out", default="d2v-demo", help="working directory (default: ./d2v-demo; replaced if present)")
    p.add_argument("--audio", default=None, help="clip to verify and transcribe (default: the bundled clip)")
    p.add_argument("--seed", type=int, default=0)
    add_precision_argument(p, "highest", "the parity check compares like with like on CPU, GPU and TPU")


def build_base_checkpoint(dst: Path, seed: int) -> Path:
    """A data2vec-audio-base-960h-shaped HF checkpoint with random weights, via save_pretrained."""
    import torch
    from transformers import Data2VecAudioConfig, Data2VecAudioForCTC

    torch.manual_seed(seed)
    model = Data2VecAudioForCTC(Data2VecAudioConfig(vocab_size=len(BASE_960H_VOCAB))).eval()
    with atomic_dir(dst, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer_files(tmp, {c: i for i, c in enumerate(BASE_960H_VOCAB)})
        save_preprocessor_config(tmp, do_normalize=True, return_attention_mask=True)
    return dst


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clip = args.audio or default_clip()
    t0 = time.perf_counter()
    if args.model is None:
        print("[1/5] building a data2vec-audio-base CTC checkpoint (random weights, transformers format) ...")
        src = build_base_checkpoint(out / "hf-base", args.seed)
    else:
        print(f"[1/5] using {args.model}")
        src = Path(load_any(args.model)[3])
    print(f"      {src}")

    print("[2/5] converting to Flax ...")
    config, spec, params, resolved = load_any(src)
    flax_dir = out / "flax"
    save_flax(flax_dir, config, params, files_from=resolved if Path(resolved).is_dir() else None, overwrite=True)
    print(f"      {flax_dir}")

    print(f"[3/5] verifying Flax against PyTorch, layer by layer, on {clip} ...")
    rows, facts = verify(str(flax_dir), [clip], precision=args.precision)
    print(format_table(rows))
    ok = all(r.passed for r in rows)
    plot_errors(rows, out / "report.png")
    atomic_write_text(out / "report.md", markdown_report(rows, facts, "report.png"))
    print(
        f"      {'PASS' if ok else 'FAIL'}: {sum(r.passed for r in rows)}/{len(rows)} stages within "
        f"{facts['tolerance']:g}; report {out / 'report.md'}\n      flax: {facts['flax']}\n"
        f"      reference: {facts['reference']}"
    )

    if spec.architecture == "Data2VecAudioForCTC" and (flax_dir / "vocab.json").is_file():
        print("[4/5] transcribing the clip with the Flax model ...")

        result = transcribe(str(flax_dir), [clip], precision=args.precision)
        text = result[0].text if hasattr(result[0], "text") else result[0]["text"]
        note = " (random weights: expect noise)" if args.model is None else ""
        print(f"      {clip}\t{text!r}{note}")
    else:
        print("[4/5] no CTC head/vocabulary in this checkpoint: skipping transcription")
    train_ok = True
    try:
        task = vt.task_of(spec.architecture)
    except D2VError as e:
        print(f"[5/5] no training parity: {e}")
    else:
        print(f"[5/5] training parity: {DEMO_TRAIN_STEPS} {task} updates of d2v finetune vs transformers + AdamW ...")
        result = vt.verify_train(str(flax_dir), steps=DEMO_TRAIN_STEPS, audio=[clip], recipe=DEMO_TRAIN_RECIPE)
        train_ok = result.passed
        vt.plot(result, out / "train_report.png")
        atomic_write_text(out / "train_report.md", vt.markdown_report(result, "train_report.png"))
        for line in result.failures():
            print(f"      FAIL {line}")
        print(f"      {vt.summary(result)}; report {out / 'train_report.md'}")
    print(f"\nFlax checkpoint: {flax_dir}   ({time.perf_counter() - t0:.0f} s)")
    return 0 if ok and train_ok else 1
