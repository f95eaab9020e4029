"""Processor files: what `flax_d2v.processor` writes, it reads back (one module for both sides)."""

from __future__ import annotations

import json

import pytest

from flax_d2v.ctc_decode import CTCTokenizer
from flax_d2v.errors import D2VError
from flax_d2v.processor import (
    PAD_ID,
    PROCESSOR_FILES,
    PreprocessorConfig,
    copy_processor_files,
    load_vocab,
    processor_class,
    read_preprocessor_config,
    read_tokenizer_files,
    save_preprocessor_config,
    save_tokenizer_files,
)

VOCAB = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "A"])}


def test_tokenizer_files_round_trip(tmp_path):
    written = save_tokenizer_files(tmp_path, VOCAB)
    assert set(written) <= set(PROCESSOR_FILES)
    vocab, cfg = read_tokenizer_files(
        tmp_path / "vocab.json", tmp_path / "tokenizer_config.json", tmp_path / "special_tokens_map.json"
    )
    assert vocab == VOCAB and load_vocab(tmp_path) == VOCAB
    assert cfg["pad_token"] == "<pad>" and cfg["word_delimiter_token"] == "|" and VOCAB["<pad>"] == PAD_ID
    tok = CTCTokenizer.from_dir(tmp_path)  # the decoder reads the files through the same reader
    assert tok.decode([6, 6, 0, 5, 4, 7]) == "TE A"
    assert processor_class(tmp_path) == "Wav2Vec2Processor"


def test_preprocessor_config_round_trip_and_copy(tmp_path):
    assert read_preprocessor_config(tmp_path) == PreprocessorConfig()  # absent: the defaults
    save_preprocessor_config(tmp_path / "m", do_normalize=False, return_attention_mask=False)
    got = read_preprocessor_config(tmp_path / "m")
    assert not got.do_normalize and not got.return_attention_mask and got.sampling_rate == 16000
    save_tokenizer_files(tmp_path / "m", VOCAB)
    copied = copy_processor_files(tmp_path / "m", tmp_path)
    assert sorted(copied) == sorted(p.name for p in (tmp_path / "m").iterdir())
    assert read_preprocessor_config(tmp_path) == got and load_vocab(tmp_path) == VOCAB


def test_multilingual_vocab_needs_target_lang(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"eng": VOCAB, "fra": VOCAB}))
    with pytest.raises(D2VError, match="target_lang"):
        read_tokenizer_files(tmp_path / "vocab.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"target_lang": "fra"}))
    assert read_tokenizer_files(tmp_path / "vocab.json", tmp_path / "tokenizer_config.json")[0] == VOCAB
