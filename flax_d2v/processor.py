"""The processor files of a model directory, read and written in one place.

transformers keeps a model's input and output conventions beside its weights, in files its
`Wav2Vec2Processor` reads: `preprocessor_config.json` (the `Wav2Vec2FeatureExtractor`: normalisation,
sampling rate, padding), `vocab.json`, `tokenizer_config.json` and `special_tokens_map.json` (the
`Wav2Vec2CTCTokenizer`), and optionally `processor_config.json`, `added_tokens.json`,
`alphabet.json` and `language_model/` (`Wav2Vec2ProcessorWithLM`). This module is core: the
checkpoint reader, the converters, `d2v transcribe`/`classify` and fine-tuning all write and read
these files through it, so a writer and its reader can never disagree.

Building a vocabulary from transcripts (and the transcript normalisation rule) is a training concern
and stays in `flax_d2v.train.vocab`; the vocabulary *layout* checked here (`<pad>`=0 is the CTC blank,
`<s>`, `</s>`, `<unk>`, `|`) is what every CTC checkpoint we write and train on relies on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flax_d2v.audio import HF_NORM_EPS, SAMPLE_RATE
from flax_d2v.errors import D2VError
from flax_d2v.fileio import atomic_write_text, read_json, read_json_object
from flax_d2v.paths import as_path

PROCESSOR_FILES = (
    "preprocessor_config.json",
    "vocab.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "processor_config.json",
    "alphabet.json",
)
PROCESSOR_DIRS = ("language_model",)  # transformers' Wav2Vec2ProcessorWithLM: attrs.json, unigrams.txt, KenLM file

# ------------------------------------------------------------------------------------ vocabulary layout
PAD = "<pad>"
BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
WORD_DELIMITER = "|"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK, WORD_DELIMITER)
PAD_ID = 0  # also the CTC blank: HF's Data2VecAudioForCTC uses config.pad_token_id as the blank.


def copy_processor_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the processor files (and `language_model/`) of `src` that exist into `dst`; the names copied."""
    copied = []
    for name in PROCESSOR_FILES:
        p = Path(src) / name
        if p.is_file():
            shutil.copyfile(p, Path(dst) / name)
            copied.append(name)
    for name in PROCESSOR_DIRS:
        p = Path(src) / name
        if p.is_dir():
            shutil.copytree(p, Path(dst) / name, dirs_exist_ok=True)
            copied.append(name + "/")
    return copied


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------ tokenizer
def validate_vocab(vocab: Mapping[str, int], source: str = "vocab") -> dict[str, int]:
    """Check the layout that CTC training relies on; returns a plain dict."""
    if not isinstance(vocab, Mapping) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
        raise D2VError(f"{source}: must be a JSON object mapping tokens to integer ids")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise D2VError(f"{source}: missing special token(s) {', '.join(missing)}")
    if vocab[PAD] != PAD_ID:
        raise D2VError(f"{source}: '{PAD}' must have id {PAD_ID} (it is the CTC blank), found {vocab[PAD]}")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise D2VError(f"{source}: ids must be 0..{len(vocab) - 1} without gaps or duplicates")
    return dict(vocab)


def load_vocab(path: str | os.PathLike) -> dict[str, int]:
    """Read an HF `vocab.json` (a file, or a directory holding one) and check its layout."""
    path = as_path(path)
    if path.is_dir():
        path = path / "vocab.json"
    return validate_vocab(read_json(path), str(path))


def save_tokenizer_files(directory: str | os.PathLike, vocab: Mapping[str, int]) -> list[str]:
    """Write vocab.json, tokenizer_config.json and special_tokens_map.json (each atomically).

    The files are what `transformers.Wav2Vec2CTCTokenizer.from_pretrained(directory)` reads; they
    are written here without importing transformers. Returns the file names written.
    """
    vocab = validate_vocab(vocab)
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    config = {
        **special,
        "do_lower_case": False,
        "word_delimiter_token": WORD_DELIMITER,
        "replace_word_delimiter_char": " ",
        "tokenizer_class": "Wav2Vec2CTCTokenizer",
        "processor_class": "Wav2Vec2Processor",
    }
    _write_json(directory / "vocab.json", dict(sorted(vocab.items(), key=lambda kv: kv[1])))
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", special)
    return ["vocab.json", "tokenizer_config.json", "special_tokens_map.json"]


def read_tokenizer_files(
    vocab_path: str | os.PathLike,
    tokenizer_config: str | os.PathLike | None = None,
    special_tokens_map: str | os.PathLike | None = None,
) -> tuple[dict[str, int], dict[str, Any]]:
    """(token -> id, tokenizer settings) as `Wav2Vec2CTCTokenizer.from_pretrained` reads them.

    Settings are `tokenizer_config.json` updated by `special_tokens_map.json` (both optional; None
    values left out). A multi-lingual `vocab.json` (one vocabulary per language) is narrowed to the
    `target_lang` of the tokenizer config. Unlike `load_vocab`, no layout is imposed: any checkpoint's
    tokenizer decodes.
    """
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise D2VError(f"{vocab_path}: no such vocab file")
    vocab = read_json(vocab_path)
    cfg: dict[str, Any] = {}
    for p in (tokenizer_config, special_tokens_map):
        if p is not None and Path(p).is_file():
            data = read_json_object(p)
            cfg.update({k: v for k, v in data.items() if v is not None})
    if isinstance(vocab, dict) and vocab and all(isinstance(v, dict) for v in vocab.values()):
        lang = cfg.get("target_lang")
        if lang not in vocab:
            raise D2VError(
                f"{vocab_path}: a multi-lingual vocab needs target_lang in tokenizer_config.json "
                f"(one of {sorted(vocab)[:5]}...), got {lang!r}"
            )
        vocab = vocab[lang]
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise D2VError(f"{vocab_path}: expected a JSON object mapping tokens to integer ids")
    return vocab, cfg


# ------------------------------------------------------------------------------------ feature extractor
@dataclasses.dataclass(frozen=True)
class PreprocessorConfig:
    """The fields of an HF `preprocessor_config.json` that change what the model is fed."""

    do_normalize: bool = True
    return_attention_mask: bool = True
    sampling_rate: int = SAMPLE_RATE
    padding_value: float = 0.0
    # not a transformers key: `d2v convert x.pt` records fairseq's eps (1e-5) here; absent, transformers' 1e-7
    normalize_eps: float = HF_NORM_EPS


def preprocessor_config(do_normalize: bool = True, return_attention_mask: bool = True) -> dict:
    """The `Wav2Vec2FeatureExtractor` settings that match our input pipeline (16 kHz, right padding with 0)."""
    return {
        "do_normalize": bool(do_normalize),
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "Wav2Vec2Processor",
        "return_attention_mask": bool(return_attention_mask),
        "sampling_rate": SAMPLE_RATE,
    }


def save_preprocessor_config(
    directory: str | os.PathLike, do_normalize: bool = True, return_attention_mask: bool = True
) -> str:
    """Write preprocessor_config.json (atomically); returns its file name."""
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / "preprocessor_config.json", preprocessor_config(do_normalize, return_attention_mask))
    return "preprocessor_config.json"


def read_preprocessor_config(model_dir: str | os.PathLike) -> PreprocessorConfig:
    """`model_dir/preprocessor_config.json` if present, else the data2vec-audio defaults."""
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return PreprocessorConfig()
    data = read_json_object(path)
    cfg = PreprocessorConfig(
        do_normalize=bool(data.get("do_normalize", True)),
        return_attention_mask=bool(data.get("return_attention_mask", True)),
        sampling_rate=int(data.get("sampling_rate", SAMPLE_RATE)),
        padding_value=float(data.get("padding_value", 0.0)),
        normalize_eps=float(data.get("normalize_eps", HF_NORM_EPS)),
    )
    if cfg.sampling_rate != SAMPLE_RATE:
        raise D2VError(f"{path}: sampling_rate {cfg.sampling_rate} is not supported (data2vec-audio is 16 kHz)")
    return cfg


# ------------------------------------------------------------------------------------ processor
def processor_class(model_dir: str | os.PathLike) -> str | None:
    """`processor_class` as transformers saves it (processor_config.json, else the feature extractor's,
    else the tokenizer's config)."""
    d = Path(model_dir)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        p = d / name
        if p.is_file():
            data = read_json_object(p)
            value = data.get("processor_class")
            if value is None and isinstance(data.get("feature_extractor"), dict):
                value = data["feature_extractor"].get("processor_class")
            if value:
                return str(value)
    return None
