"""Character vocabulary for CTC fine-tuning, in the format of transformers' `Wav2Vec2CTCTokenizer`.

    from flax_d2v.train.vocab import build_vocab, decode, encode
    vocab = build_vocab(texts)                     # or flax_d2v.processor.load_vocab("vocab.json")
    ids, n_unknown = encode("Hello, world!", vocab)
    decode(ids, vocab)                             # -> "HELLO WORLD"

The files themselves (vocab.json, tokenizer_config.json, special_tokens_map.json, preprocessor_config.json)
are read and written by `flax_d2v.processor` (`save_tokenizer_files`, `load_vocab`, `save_preprocessor_config`).

Transcript normalisation rule (`normalize_transcript`), applied to every transcript before the
vocabulary is built and before a transcript is encoded, so training targets, the saved vocabulary
and the reference text of WER/CER all agree:

1. Unicode NFKC (compatibility forms folded: full-width letters, ligatures such as "ﬁ" -> "fi").
2. Typographic apostrophes (’ ‘ ʼ ` ´ ′) become the ASCII apostrophe `'`.
3. Upper-case (`str.upper`), as LibriSpeech and the published checkpoints
   (`facebook/data2vec-audio-base-960h`: upper-case letters, `'`, `|`).
4. Letters, combining marks and decimal digits are kept, and so is `'`; every other character
   (punctuation, symbols, hyphens, control characters, whitespace) becomes a word break.
5. Words made only of apostrophes (stray quote marks) are dropped; words are joined by single
   spaces, no leading or trailing space.

Digits are kept rather than spelled out (spelling numbers is language-specific): a vocabulary
built from transcripts with digits contains them; with a vocabulary that lacks them (the
LibriSpeech one) they become `<unk>` and are counted.

Vocabulary layout (HF convention): `<pad>`=0 (also the CTC blank), `<s>`=1, `</s>`=2, `<unk>`=3,
`|`=4 (the word delimiter, standing for a space), then the characters of the normalised
transcripts by descending frequency, ties broken by code point, so the same transcripts always
give the same ids.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from flax_d2v.ctc_decode import CTCTokenizer

# The vocabulary layout and the processor files' readers and writers live in `flax_d2v.processor`
# (core: the converters write them too). Besides the names used here, they are re-exported because
# training code, benches and tests call them as `V.load_vocab(...)`, `V.save_tokenizer_files(...)`, `V.PAD_ID`.
from flax_d2v.processor import (  # noqa: F401
    BOS,
    EOS,
    PAD,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK,
    WORD_DELIMITER,
    load_vocab,
    preprocessor_config,
    save_preprocessor_config,
    save_tokenizer_files,
    validate_vocab,
)

_APOSTROPHES = {"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'", "\u2032": "'"}
_APOSTROPHE_TABLE = str.maketrans(_APOSTROPHES)


def _keep(ch: str) -> bool:
    return ch == "'" or unicodedata.category(ch)[0] in "LM" or unicodedata.category(ch) == "Nd"


def normalize_transcript(text: str) -> str:
    """Normalise a transcript by the rule in the module docstring (NFKC, upper case, letters/digits/')."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHE_TABLE).upper()
    chars = [ch if _keep(ch) else " " for ch in text]
    words = [w for w in "".join(chars).split() if w.strip("'")]
    return " ".join(words)


def build_vocab(transcripts: Iterable[str], normalize: bool = True) -> dict[str, int]:
    """An HF-style vocabulary from training transcripts (special tokens first, then by frequency)."""
    counts: Counter[str] = Counter()
    for text in transcripts:
        if text is None:
            continue
        counts.update((normalize_transcript(text) if normalize else text).replace(" ", ""))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if ch not in vocab:
            vocab[ch] = len(vocab)
    return vocab


def encode(text: str, vocab: Mapping[str, int], normalize: bool = True) -> tuple[list[int], int]:
    """Label ids of `text` and how many of its characters were not in `vocab` (mapped to `<unk>`).

    A space becomes the word delimiter `|`; this is what `Wav2Vec2CTCTokenizer` gives for the
    normalised text.
    """
    if normalize:
        text = normalize_transcript(text)
    unk = vocab[UNK]
    delim = vocab[WORD_DELIMITER]
    ids: list[int] = []
    n_unknown = 0
    for ch in text:
        if ch == " ":
            ids.append(delim)
            continue
        i = vocab.get(ch)
        if i is None:
            n_unknown += 1
            i = unk
        ids.append(i)
    return ids, n_unknown


class TranscriptLabels:
    """CTC's targets for the data loader (a `source.LabelEncoder`): `encode(text, vocab)`.

    What `CTCObjective.label_encoder` hands to `BatchLoader(labels=...)`; the vocabulary is
    checked (`validate_vocab`) when the encoder is made, before any example is encoded.
    """

    def __init__(self, vocab: Mapping[str, int]) -> None:
        self.vocab = validate_vocab(vocab)

    def __call__(self, text: str) -> tuple[list[int], int]:
        return encode(text, self.vocab)


def decode(ids: Sequence[int], vocab: Mapping[str, int], group_tokens: bool = True) -> str:
    """Text of label ids or of greedy CTC frame predictions (argmax per frame).

    Exactly `Wav2Vec2CTCTokenizer.decode(ids)` with its defaults, so our transcripts and
    transformers' agree character for character: with `group_tokens` (CTC) runs of the same id
    collapse to one, then `<pad>` (the blank) is removed, `|` becomes a space and the result is
    stripped. Other special tokens (`<unk>`, and `<s>`/`</s>`, which a CTC model is never trained
    to emit) stay literal, and a doubled delimiter gives two spaces, as in transformers; WER/CER
    tools split on whitespace anyway.
    """
    return CTCTokenizer.from_vocab(dict(vocab)).decode(ids, group_tokens=group_tokens)
