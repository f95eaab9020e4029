"""CTC decoding: greedy (bit-for-bit transformers' `Wav2Vec2CTCTokenizer.decode`) and beam search.

Greedy decoding reproduces `Wav2Vec2CTCTokenizer._decode` step by step, so that a transcript
from `d2v transcribe` equals `processor.batch_decode(logits.argmax(-1))` for the same logits:
ids -> tokens (unknown ids -> unk), optionally drop special tokens *before* grouping (as
transformers does with `skip_special_tokens=True`), group repeats, drop the pad (blank) token,
word delimiter -> `replace_word_delimiter_char`, join, strip, optional clean-up and lower case.
Word offsets follow `output_word_offsets`: frame indices; seconds are
`frame * inputs_to_logits_ratio / sampling_rate`.

Beam search, with or without a KenLM n-gram, is `flax_d2v.lm_decode` (flashlight-text, the `[lm]`
extra); it turns its best beam into text through `CTCTokenizer.decode` too.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flax_d2v.errors import D2VError
from flax_d2v.processor import read_tokenizer_files

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


@dataclasses.dataclass(frozen=True)
class WordOffset:
    """A decoded word and its CTC frame span [start_offset, end_offset)."""

    word: str
    start_offset: int
    end_offset: int

    def times(self, inputs_to_logits_ratio: int, sampling_rate: int = 16000) -> tuple[float, float]:
        """(start, end) in seconds, as transformers' docs and ASR pipeline compute them."""
        scale = inputs_to_logits_ratio / sampling_rate
        return self.start_offset * scale, self.end_offset * scale


def _token_str(value: Any) -> str | None:
    """A special token as saved by transformers: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return None if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class CTCTokenizer:
    """The decoding half of `Wav2Vec2CTCTokenizer`, without transformers."""

    vocab: dict[str, int]
    pad_token: str = "<pad>"
    unk_token: str = "<unk>"
    word_delimiter_token: str | None = "|"
    replace_word_delimiter_char: str = " "
    do_lower_case: bool = False
    clean_up_tokenization_spaces: bool = False
    special_tokens: frozenset[str] = frozenset({"<s>", "</s>", "<unk>", "<pad>"})

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> CTCTokenizer:
        """`vocab.json` plus, when present, `tokenizer_config.json` / `special_tokens_map.json`."""
        model_dir = Path(model_dir)
        vocab_path = model_dir / "vocab.json"
        if not vocab_path.is_file():
            raise D2VError(f"{model_dir}: no vocab.json (a CTC model needs its tokenizer's vocab.json to decode)")
        return cls.from_files(vocab_path, model_dir / "tokenizer_config.json", model_dir / "special_tokens_map.json")

    @classmethod
    def from_files(
        cls,
        vocab_path: str | os.PathLike,
        tokenizer_config: str | os.PathLike | None = None,
        special_tokens_map: str | os.PathLike | None = None,
    ) -> CTCTokenizer:
        vocab, cfg = read_tokenizer_files(vocab_path, tokenizer_config, special_tokens_map)
        return cls.from_vocab(vocab, **cfg)

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], **tokenizer_config: Any) -> CTCTokenizer:
        """From a token->id dict and `Wav2Vec2CTCTokenizer` keyword arguments (unknown ones ignored)."""
        specials = dict(_DEFAULT_SPECIALS)
        for key in _SPECIAL_KEYS:
            if key in tokenizer_config:
                specials[key] = _token_str(tokenizer_config[key])
        extra = tokenizer_config.get("extra_special_tokens") or tokenizer_config.get("additional_special_tokens") or []
        if isinstance(extra, dict):
            extra = list(extra.values())
        all_special = {t for t in specials.values() if t is not None} | {_token_str(t) for t in extra}
        delimiter = tokenizer_config.get("word_delimiter_token", "|")
        return cls(
            vocab=dict(vocab),
            pad_token=specials.get("pad_token") or "<pad>",
            unk_token=specials.get("unk_token") or "<unk>",
            word_delimiter_token=_token_str(delimiter),
            replace_word_delimiter_char=str(tokenizer_config.get("replace_word_delimiter_char", " ")),
            do_lower_case=bool(tokenizer_config.get("do_lower_case", False)),
            clean_up_tokenization_spaces=bool(tokenizer_config.get("clean_up_tokenization_spaces", False)),
            special_tokens=frozenset(t for t in all_special if t is not None),
        )

    # ------------------------------------------------------------------ greedy decoding
    @functools.cached_property
    def id_to_token(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    def decode(
        self,
        ids: Sequence[int] | np.ndarray,
        skip_special_tokens: bool = False,
        output_word_offsets: bool = False,
        group_tokens: bool = True,
    ) -> str | tuple[str, list[WordOffset]]:
        """Text (and word offsets) for one sequence of per-frame argmax ids.

        `group_tokens=False` reads label ids (no CTC collapsing of repeats), as transformers' flag.
        """
        id_to_token = self.id_to_token
        tokens = [id_to_token.get(int(i), self.unk_token) for i in np.asarray(ids).reshape(-1)]
        if skip_special_tokens:
            # transformers drops special tokens (the pad/blank included) before grouping repeats.
            tokens = [t for t in tokens if t not in self.special_tokens or t == self.word_delimiter_token]
        text, words = self._tokens_to_string(tokens, output_word_offsets, group_tokens)
        if self.clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        return (text, words) if output_word_offsets else text

    def _tokens_to_string(
        self, tokens: list[str], with_offsets: bool, group_tokens: bool = True
    ) -> tuple[str, list[WordOffset]]:
        if not tokens:
            return "", []
        if group_tokens:
            groups = [(tok, len(list(run))) for tok, run in itertools.groupby(tokens)]
        else:
            groups = [(tok, 1) for tok in tokens]
        chars = [
            self.replace_word_delimiter_char if t == self.word_delimiter_token else t
            for t, _ in groups
            if t != self.pad_token
        ]
        text = "".join(chars).strip()
        if self.do_lower_case:
            text = text.lower()
        if not with_offsets:
            return text, []
        ends = np.cumsum([n for _, n in groups])
        starts = np.concatenate([[0], ends[:-1]])
        spans = [(int(s), int(e)) for (t, _), s, e in zip(groups, starts, ends, strict=True) if t != self.pad_token]
        return text, _word_offsets(chars, spans, self.replace_word_delimiter_char)


def _word_offsets(chars: list[str], spans: list[tuple[int, int]], delimiter: str) -> list[WordOffset]:
    """transformers' `_get_word_offsets`: runs of non-delimiter characters with their frame spans."""
    words: list[WordOffset] = []
    last_state, word, start, end = "SPACE", "", 0, 0
    for char, (s, e) in zip(chars, spans, strict=True):
        state = "SPACE" if char == delimiter else "WORD"
        if state == last_state:
            end = e
            word += char
        elif state == "SPACE":
            words.append(WordOffset(word, start, end))
        else:
            word, start, end = char, s, e
        last_state = state
    if last_state == "WORD":
        words.append(WordOffset(word, start, end))
    return words


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (on when a tokenizer_config asks for it)."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text
