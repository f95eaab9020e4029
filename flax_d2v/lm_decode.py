"""CTC beam search with an optional KenLM n-gram, through flashlight-text (`pip install 'flax-d2v[lm]'`).

    decoder = BeamSearchDecoder(tokenizer, num_logits, beam_width=100, lm="4-gram.arpa", lexicon="words.txt")
    text, word_offsets = decoder.decode(log_probs)          # (frames, vocab) CTC log-probabilities

Why flashlight-text: it is the decoder behind torchaudio's `ctc_decoder` and fairseq's
`W2lKenLMDecoder` (the one every published wav2vec 2.0 / data2vec 4-gram WER was decoded with),
it ships manylinux wheels for CPython 3.10-3.12 with KenLM compiled in (ARPA, gzipped ARPA and
KenLM binary files load), has no Python dependencies and no numpy pin. pyctcdecode, the decoder
of transformers' `Wav2Vec2ProcessorWithLM`, pins numpy<2 and needs `kenlm`, which has no wheel.

Three modes, chosen by what is given:

- *Word LM with a lexicon* (fairseq's and torchaudio's default): beams only ever spell words of
  the lexicon, and each finished word is scored by the word n-gram. The lexicon is `--lexicon`
  (one word per line; an optional spelling may follow the word, as in wav2letter lexicons) or,
  without one, the LM's own unigrams (the ARPA `\\1-grams:` section, or `unigrams.txt` of a
  transformers directory). Spellings are derived from the model's vocabulary: each character
  as is, else upper-cased, else lower-cased (so a lower-case LM works with an upper-case model);
  words with a character the model cannot emit are left out and reported once. Every spelling
  ends with the word delimiter, as in wav2letter lexicons, so a CTC repeat of a word's last
  letter stays inside the word; a final delimiter frame is appended to the emissions so the
  last word of an utterance is completed even when the model emits no trailing delimiter.
- *Lexicon-free with a token LM* (`lexicon_free=True`, or automatically when every unigram of
  an ARPA file is one of the model's tokens): an n-gram over the model's characters, with `|`
  for the word break (text written as `H E L L O | W O R L D`), scored at every emitted token.
- *No LM*: lexicon-free beam search over the tokens (flashlight's `ZeroLM`); with beam width 1
  it is greedy decoding.

Scores (fairseq's and flashlight's units): score = sum of CTC log-probabilities (natural log)
+ lm_weight * KenLM log10 probability + word_score per word. Defaults are fairseq's LibriSpeech
4-gram settings (`--lm-weight 2 --word-score -1`). transformers' (pyctcdecode's) `alpha` weighs a
natural-log LM score, so a `language_model/attrs.json` alpha is used as lm_weight = alpha * ln 10;
its `beta` is a per-word bonus in the same units as word_score and is used as is. Hypotheses are
merged by max (Viterbi), as in fairseq and torchaudio (`log_add=False`).

The text comes from the best beam's frame-level token path through `CTCTokenizer.decode`, so
case, clean-up and word offsets follow exactly the rules of greedy decoding.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flax_d2v import paths
from flax_d2v.ctc_decode import CTCTokenizer, WordOffset
from flax_d2v.errors import D2VError
from flax_d2v.fileio import read_json_object
from flax_d2v.processor import processor_class

DEFAULT_LM_WEIGHT = 2.0  # fairseq wav2vec 2.0 / data2vec README, LibriSpeech 4-gram (log10 LM units)
DEFAULT_WORD_SCORE = -1.0  # ditto
DEFAULT_LM_BEAM_WIDTH = 100  # beam width when an LM is used and none is given (pyctcdecode's / transformers')
BEAM_THRESHOLD = 25.0  # fairseq infer.py --beam-threshold: hypotheses this far below the best are pruned
HF_ALPHA, HF_BETA = 0.5, 1.5  # pyctcdecode's defaults when attrs.json lacks them
LN10 = math.log(10.0)
IMPOSSIBLE = -1e4  # log-prob for logit columns the vocabulary does not name (never chosen, never NaN)
LM_DIR = "language_model"  # transformers' Wav2Vec2ProcessorWithLM layout
LM_SUFFIXES = (".arpa", ".bin", ".binary")
_KENLM_BINARY_MAGIC = b"mmap lm "
_ARPA_SPECIALS = frozenset({"<s>", "</s>", "<unk>"})

Warn = Callable[[str], None]


def require_flashlight(what: str) -> tuple[Any, Any]:
    """flashlight-text's decoder and dictionary modules, or a one-line error naming the package."""
    try:
        from flashlight.lib.text import decoder, dictionary
    except ImportError:
        raise D2VError(
            f"{what} needs the flashlight-text package, which is not installed "
            "(pip install 'flax-d2v[lm]', or pip install flashlight-text)"
        ) from None
    return decoder, dictionary


# ---------------------------------------------------------------------------------------- files
def is_kenlm_binary(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_KENLM_BINARY_MAGIC)) == _KENLM_BINARY_MAGIC


def _open_text(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")


def read_arpa_unigrams(path: str | os.PathLike) -> list[str]:
    """The words of an ARPA file's `\\1-grams:` section (plain or gzipped), <s>/</s>/<unk> left out.

    Reads only up to the 2-grams, so a multi-gigabyte 4-gram costs a few seconds, not a full parse.
    """
    path = Path(path)
    words: list[str] = []
    try:
        with _open_text(path) as f:
            first = next((line.strip() for line in f if line.strip()), "")
            if first != "\\data\\":
                raise D2VError(
                    f"{path}: not an ARPA language model (first line {first[:40]!r}, expected \\data\\) "
                    "nor a KenLM binary"
                )
            inside = False
            for line in f:
                line = line.strip()
                if line == "\\1-grams:":
                    inside = True
                elif inside and (line.startswith("\\") or not line):
                    if line.startswith("\\") or words:
                        break
                elif inside:
                    parts = line.split()
                    if len(parts) >= 2 and parts[1] not in _ARPA_SPECIALS:
                        words.append(parts[1])
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise D2VError(f"{path}: not a readable ARPA language model ({type(e).__name__}: {e})") from None
    if not inside:
        raise D2VError(f"{path}: not a readable ARPA language model (no \\1-grams: section)")
    return words


def read_word_list(path: str | os.PathLike) -> list[tuple[str, list[str] | None]]:
    """(word, spelling or None) per line: `WORD` or a wav2letter lexicon line `WORD W O R D |`."""
    path = Path(path)
    if not path.is_file():
        raise D2VError(f"{path}: no such lexicon file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise D2VError(f"{path}: not a readable UTF-8 word list ({type(e).__name__})") from None
    out = []
    for line in lines:
        parts = line.split()
        if parts:
            out.append((parts[0], parts[1:] or None))
    return out


@dataclass(frozen=True)
class HFLanguageModel:
    """The `language_model/` of a transformers `Wav2Vec2ProcessorWithLM` directory."""

    path: Path  # the KenLM file
    unigrams: Path | None
    alpha: float
    beta: float

    @property
    def lm_weight(self) -> float:
        return self.alpha * LN10  # pyctcdecode: alpha * ln(10) * log10 p = alpha * ln p

    @property
    def word_score(self) -> float:
        return self.beta


def find_hf_language_model(model_dir: str | os.PathLike) -> HFLanguageModel | None:
    """The LM a transformers ASR pipeline would decode this directory with, or None.

    As transformers does, only a directory whose processor_class ends in `WithLM` has one; it is
    then `language_model/` with `attrs.json` (alpha, beta), `unigrams.txt` and one KenLM file.
    """
    d = Path(model_dir)
    cls = processor_class(d)
    if not cls or not cls.endswith("WithLM"):
        return None
    lm_dir = d / LM_DIR
    if not lm_dir.is_dir():
        raise D2VError(
            f"{d}: processor_class is {cls} but there is no {LM_DIR}/ directory "
            "(pass --no-lm to decode without a language model)"
        )
    files = sorted(p for p in lm_dir.iterdir() if p.is_file() and p.suffix in LM_SUFFIXES)
    if len(files) != 1:
        raise D2VError(
            f"{lm_dir}: expected one KenLM file (.arpa, .bin or .binary), found {[p.name for p in files] or 'none'}"
        )
    attrs = read_json_object(lm_dir / "attrs.json") if (lm_dir / "attrs.json").is_file() else {}
    try:
        alpha, beta = float(attrs.get("alpha", HF_ALPHA)), float(attrs.get("beta", HF_BETA))
    except (TypeError, ValueError):
        raise D2VError(f"{lm_dir / 'attrs.json'}: alpha and beta must be numbers") from None
    unigrams = lm_dir / "unigrams.txt"
    return HFLanguageModel(files[0], unigrams if unigrams.is_file() else None, alpha, beta)


# ---------------------------------------------------------------------------------------- spelling
def spell(word: str, spelling: Sequence[str] | None, tokens: frozenset[str]) -> list[str] | None:
    """The model tokens that write `word` (or its given spelling), or None if one is missing.

    Each unit as is, else upper-cased, else lower-cased.
    """
    out = []
    for unit in spelling if spelling is not None else list(word):
        for cand in (unit, unit.upper(), unit.lower()):
            if cand in tokens:
                out.append(cand)
                break
        else:
            return None
    return out or None


def build_lexicon(
    words: Sequence[tuple[str, list[str] | None]], tokenizer: CTCTokenizer, source: str, warn: Warn | None
) -> dict[str, list[list[str]]]:
    """word -> spellings (each ending with the word delimiter); unspellable words reported once."""
    delimiter = tokenizer.word_delimiter_token
    if delimiter is None or delimiter not in tokenizer.vocab:
        raise D2VError(
            f"{source}: word-level LM decoding needs the word delimiter token ({delimiter!r}) in the "
            "model's vocabulary; use --lexicon-free with an LM over its tokens"
        )
    letters = frozenset(t for t in tokenizer.vocab if t not in tokenizer.special_tokens and t != delimiter)
    lexicon: dict[str, list[list[str]]] = {}
    missing: list[str] = []
    for word, given in words:
        if given is not None and given[-1] == delimiter:
            given = given[:-1]
        letters_of = spell(word, given, letters)
        if letters_of is None:
            missing.append(word)
            continue
        spellings = lexicon.setdefault(word, [])
        if letters_of + [delimiter] not in spellings:
            spellings.append(letters_of + [delimiter])
    if not lexicon:
        raise D2VError(
            f"{source}: no word can be spelled with the model's vocabulary "
            f"({len(missing)} word(s), e.g. {missing[:3]}; is this the LM for this model's alphabet?)"
        )
    if missing and warn is not None:
        total = len({w for w, _ in words})
        warn(
            f"{source}: {len(set(missing))} of {total} words cannot be "
            f"spelled with the model's vocabulary and are left out (e.g. {', '.join(repr(w) for w in missing[:3])})"
        )
    return lexicon


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """KenLM prints a loading progress bar to file descriptor 2; keep it off the user's terminal."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


def load_kenlm(path: str | os.PathLike, dictionary: Any) -> Any:
    """flashlight's KenLM over `dictionary`; a one-line error naming the file if it does not load."""
    require_flashlight(f"{path}: an n-gram language model")
    from flashlight.lib.text.decoder.kenlm import KenLM

    try:
        with _quiet_stderr():
            return KenLM(os.fspath(path), dictionary)
    except (RuntimeError, UnicodeDecodeError, ValueError, OSError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else type(e).__name__
        raise D2VError(f"{path}: not a KenLM language model that loads (ARPA or KenLM binary): {reason}") from None


# ---------------------------------------------------------------------------------------- the decoder
class BeamSearchDecoder:
    """flashlight-text CTC beam search over a tokenizer's labels, with an optional KenLM n-gram.

    lm: a KenLM file (.arpa, .arpa.gz, .bin); None = no LM (lexicon-free, ZeroLM).
    lexicon: a word list (or a wav2letter lexicon); default the LM's unigrams (`unigrams` file,
        e.g. transformers' `language_model/unigrams.txt`, else the ARPA 1-grams).
    lexicon_free: an LM over the model's tokens; None = decide from the ARPA unigrams.
    lm_weight / word_score: fusion weights (module docstring); None = fairseq's 4-gram defaults.
    """

    def __init__(
        self,
        tokenizer: CTCTokenizer,
        num_logits: int,
        beam_width: int = DEFAULT_LM_BEAM_WIDTH,
        *,
        lm: str | os.PathLike | None = None,
        lexicon: str | os.PathLike | None = None,
        unigrams: str | os.PathLike | None = None,
        lexicon_free: bool | None = None,
        lm_weight: float | None = None,
        word_score: float | None = None,
        beam_threshold: float = BEAM_THRESHOLD,
        warn: Warn | None = None,
    ):
        fl_decoder, fl_dict = require_flashlight("--lm" if lm is not None else "--beam-width: beam search")
        if beam_width < 1:
            raise D2VError(f"--beam-width: must be >= 1 for beam search, got {beam_width}")
        self.tokenizer, self.beam_width = tokenizer, int(beam_width)
        id_to_token = tokenizer.id_to_token
        self.unused = np.array([i not in id_to_token for i in range(num_logits)])
        labels = [id_to_token.get(i, f"<unused_{i}>") for i in range(num_logits)]
        if tokenizer.pad_token not in tokenizer.vocab:
            raise D2VError(f"beam search: the vocabulary has no pad (blank) token {tokenizer.pad_token!r}")
        self.blank = tokenizer.vocab[tokenizer.pad_token]
        delimiter = tokenizer.word_delimiter_token
        self.sil = tokenizer.vocab.get(delimiter, self.blank) if delimiter else self.blank
        self.token_dict = fl_dict.Dictionary(labels)
        self.lm_weight = DEFAULT_LM_WEIGHT if lm_weight is None else float(lm_weight)
        self.word_score = DEFAULT_WORD_SCORE if word_score is None else float(word_score)
        self.lexicon_mode = False
        self.lm_path = None if lm is None else Path(lm)
        if self.lm_path is None:
            if lexicon is not None:
                raise D2VError(f"{lexicon}: --lexicon needs --lm (a word n-gram to score the words with)")
            self._decoder = self._lexicon_free(fl_decoder, fl_decoder.ZeroLM(), beam_threshold, weight=0.0)
            return
        if not self.lm_path.is_file():
            raise D2VError(f"{self.lm_path}: no such language model file")
        binary = is_kenlm_binary(self.lm_path)
        arpa_words = None if binary else read_arpa_unigrams(self.lm_path)
        if lexicon_free is None:
            tokens = set(labels) | _ARPA_SPECIALS
            lexicon_free = lexicon is None and arpa_words is not None and set(arpa_words) <= tokens
        if lexicon_free:
            if lexicon is not None:
                raise D2VError(f"{lexicon}: a lexicon cannot be used with lexicon-free decoding")
            kenlm = load_kenlm(self.lm_path, self.token_dict)
            self._decoder = self._lexicon_free(fl_decoder, kenlm, beam_threshold, weight=self.lm_weight)
            return
        if lexicon is not None:
            words, source = read_word_list(lexicon), str(lexicon)
        elif unigrams is not None:
            words, source = read_word_list(unigrams), str(unigrams)
        elif arpa_words is not None:
            words, source = [(w, None) for w in arpa_words], str(self.lm_path)
        else:
            raise D2VError(
                f"{self.lm_path}: a KenLM binary does not list its words; give --lexicon (a word list, "
                "e.g. the LM's vocabulary) or use the ARPA file"
            )
        spelled = build_lexicon(words, tokenizer, source, warn)
        if arpa_words is not None and lexicon is not None and warn is not None:
            known = set(arpa_words)
            unknown = [w for w in spelled if w not in known]
            if unknown:  # e.g. a lower-case word list with an upper-case LM: the LM would not help
                warn(
                    f"{source}: {len(unknown)} of {len(spelled)} words are not in {self.lm_path} and are scored as "
                    f"its <unk> (e.g. {', '.join(repr(w) for w in unknown[:3])})"
                )
        self._decoder = self._lexicon_decoder(fl_decoder, fl_dict, spelled, beam_threshold)
        self.lexicon_mode = True
        self.words = frozenset(spelled)

    def _lexicon_free(self, fl: Any, lm: Any, beam_threshold: float, weight: float) -> Any:
        options = fl.LexiconFreeDecoderOptions(
            beam_size=self.beam_width,
            beam_size_token=len(self.unused),
            beam_threshold=beam_threshold,
            lm_weight=weight,
            sil_score=0.0,
            log_add=False,
            criterion_type=fl.CriterionType.CTC,
        )
        self._lm = lm  # the decoder holds a reference in C++; keep the Python object alive too
        return fl.LexiconFreeDecoder(options, lm, self.sil, self.blank, [])

    def _lexicon_decoder(
        self, fl: Any, fl_dict: Any, lexicon: dict[str, list[list[str]]], beam_threshold: float
    ) -> Any:
        unk = "<unk>"
        self.word_dict = fl_dict.Dictionary(sorted(lexicon) + ([unk] if unk not in lexicon else []))
        self.word_dict.set_default_index(self.word_dict.get_index(unk))
        lm = load_kenlm(self.lm_path, self.word_dict)
        trie = fl.Trie(len(self.unused), self.sil)
        start = lm.start(False)
        for word, spellings in lexicon.items():
            index = self.word_dict.get_index(word)
            _, score = lm.score(start, index)  # the word's unigram score: the trie's look-ahead bound
            for spelling in spellings:
                trie.insert([self.token_dict.get_index(t) for t in spelling], index, score)
        trie.smear(fl.SmearingMode.MAX)
        options = fl.LexiconDecoderOptions(
            beam_size=self.beam_width,
            beam_size_token=len(self.unused),
            beam_threshold=beam_threshold,
            lm_weight=self.lm_weight,
            word_score=self.word_score,
            unk_score=-math.inf,
            sil_score=0.0,
            log_add=False,
            criterion_type=fl.CriterionType.CTC,
        )
        self._lm, self._trie = lm, trie
        return fl.LexiconDecoder(options, trie, lm, self.sil, self.blank, self.word_dict.get_index(unk), [], False)

    def best_path(self, log_probs: np.ndarray) -> np.ndarray:
        """The best beam's token id per frame (blanks and repeats included), for (frames, vocab) scores.

        `log_probs` are normalised here (log-softmax), so raw logits work too.
        """
        x = np.asarray(log_probs, np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.unused):
            raise D2VError(f"beam search: expected (frames, {len(self.unused)}) scores, got shape {x.shape}")
        n = len(x)
        if n == 0:
            return np.zeros(0, np.int64)
        x = x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
        if self.unused.any():
            x = np.where(self.unused[None, :], IMPOSSIBLE, x)
        if self.lexicon_mode:  # a word is finished by its delimiter: give the last word one to end on
            end = np.full((1, x.shape[1]), IMPOSSIBLE, np.float32)
            end[0, self.sil] = 0.0
            x = np.concatenate([x, end])
        x = np.ascontiguousarray(x, np.float32)
        results = self._decoder.decode(x.ctypes.data, x.shape[0], x.shape[1])
        paths = [np.asarray(r.tokens, np.int64)[1:-1] for r in results]  # flashlight pads one token each side
        if not self.lexicon_mode:
            return paths[0]
        # The best hypothesis whose last word is finished (it took the appended delimiter). When the
        # whole beam is inside an unfinished word (noise can push every finished one past the beam
        # threshold), the best one's unfinished letters are dropped: they spell no lexicon word.
        finished = [p for p in paths if p[n] == self.sil]
        if finished:
            return self._one_break_between_words(finished[0][:n])
        path = paths[0][:n].copy()
        breaks = np.flatnonzero(path == self.sil)
        path[breaks[-1] + 1 if len(breaks) else 0 :] = self.blank
        return self._one_break_between_words(path)

    def _one_break_between_words(self, path: np.ndarray) -> np.ndarray:
        """Between two lexicon words the beam may say `|`, blank, `|`: one word break, not two spaces.

        (Greedy decoding keeps such doubles, as transformers does; a lexicon decode is a word sequence.)
        """
        out = path.copy()
        last = None
        for i, t in enumerate(path):
            if t == self.blank:
                continue
            if t == self.sil and last == self.sil:
                out[i] = self.blank
            last = t
        return out

    def decode(self, log_probs: np.ndarray, skip_special_tokens: bool = False) -> tuple[str, list[WordOffset]]:
        """Best beam's text and word frame offsets, by the same rules as greedy decoding."""
        text, words = self.tokenizer.decode(self.best_path(log_probs), skip_special_tokens, output_word_offsets=True)
        return text, words


def decoder_for(
    tokenizer: CTCTokenizer,
    num_logits: int,
    *,
    beam_width: int = 0,
    lm: str | os.PathLike | bool | None = None,
    model_dir: str | os.PathLike | None = None,
    lexicon: str | os.PathLike | None = None,
    lexicon_free: bool | None = None,
    lm_weight: float | None = None,
    word_score: float | None = None,
    warn: Warn | None = None,
) -> BeamSearchDecoder | None:
    """The decoder `d2v transcribe` and `flax_d2v.transcribe` use; None means greedy.

    lm: a KenLM file; None = the model directory's own (transformers' `language_model/`, with its
        alpha/beta unless lm_weight/word_score are given), if it has one; False = no LM.
    beam_width: 0 or 1 = greedy unless an LM is used (then `DEFAULT_LM_BEAM_WIDTH`).
    """
    if beam_width < 0:
        raise D2VError(f"--beam-width: must be >= 0, got {beam_width}")
    unigrams = None
    if lm is None and model_dir is not None:
        hf = find_hf_language_model(model_dir)
        if hf is not None:
            require_flashlight(f"{hf.path}: the model's language model (pass --no-lm to decode without it)")
            lm, unigrams = hf.path, hf.unigrams
            lm_weight = hf.lm_weight if lm_weight is None else lm_weight
            word_score = hf.word_score if word_score is None else word_score
            if warn is not None:
                warn(
                    f"decoding with the model's language model {hf.path} (lm_weight {lm_weight:.4g} = alpha "
                    f"{hf.alpha:g} x ln 10, word_score {word_score:g} = beta); --no-lm decodes without it"
                )
    if lm is False or lm is None:
        if lexicon is not None:
            raise D2VError(f"{lexicon}: --lexicon needs --lm (a word n-gram to score the words with)")
        return BeamSearchDecoder(tokenizer, num_logits, beam_width) if beam_width > 1 else None
    # KenLM and flashlight open local files only: an LM or lexicon URL is downloaded once
    local = lambda p: None if p is None else paths.localize(p)
    return BeamSearchDecoder(
        tokenizer,
        num_logits,
        beam_width if beam_width > 1 else DEFAULT_LM_BEAM_WIDTH,
        lm=local(lm),
        lexicon=local(lexicon),
        unigrams=local(unigrams),
        lexicon_free=lexicon_free,
        lm_weight=lm_weight,
        word_score=word_score,
        warn=warn,
    )
