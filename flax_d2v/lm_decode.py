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

pyctcdecode's two other settings (`attrs.json`, or the keyword arguments of the same names):

- `score_boundary` (pyctcdecode's default true): the sentence is scored from KenLM's
  begin-of-sentence state and its end with `</s>` (pyctcdecode's `BeginSentenceWrite` and final
  `</s>` score), which is what flashlight does. False starts from KenLM's null context
  (`NullContextWrite`) and scores no `</s>`: flashlight's KenLM is then wrapped in a Python `LM`
  whose `start` ignores flashlight's begin-of-sentence request and whose `finish` adds nothing.
- `unk_score_offset` (log10 LM units; pyctcdecode's default -10): a word outside the lexicon may
  be written, scored as pyctcdecode scores it: lm_weight * (log10 P(<unk> | context) + offset) +
  word_score. This is flashlight's unknown-word path (`unk_score` = lm_weight * offset +
  word_score, since flashlight adds no word_score to it). flashlight only walks the lexicon's
  trie, so the unknown words it can write are the beginnings of lexicon spellings that are not
  words themselves (pyctcdecode can write any letter string). -inf (or None) writes no unknown
  word, fairseq's and torchaudio's default. flashlight's lexicon-free decoder (a token LM) has
  no unknown-word path, so a finite offset is refused there, in one line.

The text comes from the best beam's frame-level token path through `CTCTokenizer.decode`, so
case, clean-up and word offsets follow exactly the rules of greedy decoding.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flax_d2v import paths
from flax_d2v.ctc_decode import CTCTokenizer, WordOffset
from flax_d2v.errors import D2VError
from flax_d2v.lm_files import (  # noqa: F401  (HFLanguageModel, read_word_list: this module's API since before lm_files)
    ARPA_SPECIALS,
    LN10,
    HFLanguageModel,
    find_hf_language_model,
    is_kenlm_binary,
    read_arpa_unigrams,
    read_word_list,
)

DEFAULT_LM_WEIGHT = 2.0  # fairseq wav2vec 2.0 / data2vec README, LibriSpeech 4-gram (log10 LM units)
DEFAULT_WORD_SCORE = -1.0  # ditto
DEFAULT_LM_BEAM_WIDTH = 100  # beam width when an LM is used and none is given (pyctcdecode's / transformers')
BEAM_THRESHOLD = 25.0  # fairseq infer.py --beam-threshold: hypotheses this far below the best are pruned
IMPOSSIBLE = -1e4  # log-prob for logit columns the vocabulary does not name (never chosen, never NaN)

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
def without_sentence_boundary(fl: Any, kenlm: Any) -> Any:
    """`kenlm` as pyctcdecode scores it with `score_boundary=false`: from KenLM's null context, no `</s>`.

    flashlight's decoders start every sentence with `lm.start(False)` (KenLM's BeginSentenceWrite)
    and end it with `lm.finish` (the `</s>` score). This Python `LM` answers the first with the
    null context and the second with nothing; word scores pass through unchanged, and the states
    are KenLM's own, so flashlight's state cache works as before.
    """

    class NullContextLM(fl.LM):
        def start(self, start_with_nothing: bool) -> Any:
            return kenlm.start(True)

        def score(self, state: Any, token: int) -> tuple[Any, float]:
            return kenlm.score(state, token)

        def finish(self, state: Any) -> tuple[Any, float]:
            return state, 0.0

    return NullContextLM()


class BeamSearchDecoder:
    """flashlight-text CTC beam search over a tokenizer's labels, with an optional KenLM n-gram.

    lm: a KenLM file (.arpa, .arpa.gz, .bin); None = no LM (lexicon-free, ZeroLM).
    lexicon: a word list (or a wav2letter lexicon); default the LM's unigrams (`unigrams` file,
        e.g. transformers' `language_model/unigrams.txt`, filtered by the LM's vocabulary as
        pyctcdecode filters it; else the ARPA 1-grams).
    lexicon_free: an LM over the model's tokens; None = decide from the ARPA unigrams.
    lm_weight / word_score: fusion weights (module docstring); None = fairseq's 4-gram defaults.
    unk_score_offset / score_boundary: pyctcdecode's settings (module docstring); None = no
        unknown words. `settings` names where they came from, for error messages.
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
        unk_score_offset: float | None = None,
        score_boundary: bool = True,
        settings: str = "beam search",
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
        self.unk_score_offset = -math.inf if unk_score_offset is None else float(unk_score_offset)
        if math.isnan(self.unk_score_offset) or self.unk_score_offset == math.inf:
            raise D2VError(f"{settings}: unk_score_offset must be a number or -inf, got {unk_score_offset}")
        self.score_boundary = bool(score_boundary)
        self.lexicon_mode = False
        self.unk_word = -1
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
            tokens = set(labels) | ARPA_SPECIALS
            lexicon_free = lexicon is None and arpa_words is not None and set(arpa_words) <= tokens
        if lexicon_free:
            if lexicon is not None:
                raise D2VError(f"{lexicon}: a lexicon cannot be used with lexicon-free decoding")
            if self.unk_score_offset > -math.inf:
                raise D2VError(
                    f"{settings}: unk_score_offset {self.unk_score_offset:g} cannot be honoured with "
                    f"{self.lm_path}, an LM over the model's tokens (flashlight's lexicon-free decoder has no "
                    "unknown-word score); set it to -Infinity or null"
                )
            kenlm = self._scoring_lm(fl_decoder, load_kenlm(self.lm_path, self.token_dict))
            self._decoder = self._lexicon_free(fl_decoder, kenlm, beam_threshold, weight=self.lm_weight)
            return
        if lexicon is not None:
            words, source = read_word_list(lexicon), str(lexicon)
        elif unigrams is not None:
            words, source = read_word_list(unigrams), str(unigrams)
            words = self._known_to_the_lm(words, arpa_words, source, warn)
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

    def _known_to_the_lm(
        self, words: list[tuple[str, list[str] | None]], arpa_words: list[str] | None, source: str, warn: Warn | None
    ) -> list[tuple[str, list[str] | None]]:
        """pyctcdecode's `_prepare_unigram_set`: only the unigrams the LM knows; how many were dropped is said."""
        if arpa_words is None:
            if warn is not None:
                warn(
                    f"{source}: not checked against {self.lm_path}, a KenLM binary, whose words flashlight does not "
                    "list (pyctcdecode drops the words the LM does not know; here they are scored as its <unk>)"
                )
            return words
        known = set(arpa_words)
        kept = [(w, s) for w, s in words if w in known]
        dropped = sorted({w for w, _ in words if w not in known})
        if not kept:
            raise D2VError(f"{source}: none of its {len(words)} words is in {self.lm_path} (is it this LM's list?)")
        if dropped and warn is not None:
            warn(
                f"{source}: {len(dropped)} of {len({w for w, _ in words})} words are not in {self.lm_path} and are "
                f"left out, as pyctcdecode leaves them out (e.g. {', '.join(repr(w) for w in dropped[:3])})"
            )
        return kept

    def _scoring_lm(self, fl: Any, kenlm: Any) -> Any:
        self._kenlm = kenlm  # the decoder holds a reference in C++; keep the Python objects alive too
        return kenlm if self.score_boundary else without_sentence_boundary(fl, kenlm)

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
        self._lm = lm
        return fl.LexiconFreeDecoder(options, lm, self.sil, self.blank, [])

    def _lexicon_decoder(
        self, fl: Any, fl_dict: Any, lexicon: dict[str, list[list[str]]], beam_threshold: float
    ) -> Any:
        unk = "<unk>"
        self.word_dict = fl_dict.Dictionary(sorted(lexicon) + ([unk] if unk not in lexicon else []))
        self.word_dict.set_default_index(self.word_dict.get_index(unk))
        lm = self._scoring_lm(fl, load_kenlm(self.lm_path, self.word_dict))
        trie = fl.Trie(len(self.unused), self.sil)
        start = lm.start(False)  # as the decoder starts a sentence
        for word, spellings in lexicon.items():
            index = self.word_dict.get_index(word)
            _, score = lm.score(start, index)  # the word's first-word score: the trie's look-ahead bound
            for spelling in spellings:
                trie.insert([self.token_dict.get_index(t) for t in spelling], index, score)
        trie.smear(fl.SmearingMode.MAX)
        # flashlight adds lm_weight * log10 P(<unk> | context) + unk_score to an unknown word, and no word_score
        unk_score = self.unk_score_offset
        if unk_score > -math.inf:
            unk_score = self.lm_weight * self.unk_score_offset + self.word_score
        options = fl.LexiconDecoderOptions(
            beam_size=self.beam_width,
            beam_size_token=len(self.unused),
            beam_threshold=beam_threshold,
            lm_weight=self.lm_weight,
            word_score=self.word_score,
            unk_score=unk_score,
            sil_score=0.0,
            log_add=False,
            criterion_type=fl.CriterionType.CTC,
        )
        self._lm, self._trie = lm, trie
        self.unk_word = self.word_dict.get_index(unk)
        return fl.LexiconDecoder(options, trie, lm, self.sil, self.blank, self.unk_word, [], False)

    def best_path(self, log_probs: np.ndarray) -> np.ndarray:
        """The best beam's token id per frame (blanks and repeats included), for (frames, vocab) scores.

        `log_probs` are normalised here (log-softmax), so raw logits work too.
        """
        return self._best(log_probs)[0]

    def _best(self, log_probs: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """`best_path`, and the frames after which a word break is missing (an unknown word's end)."""
        x = np.asarray(log_probs, np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.unused):
            raise D2VError(f"beam search: expected (frames, {len(self.unused)}) scores, got shape {x.shape}")
        n = len(x)
        if n == 0:
            return np.zeros(0, np.int64), []
        x = x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
        if self.unused.any():
            x = np.where(self.unused[None, :], IMPOSSIBLE, x)
        if self.lexicon_mode:  # a word is finished by its delimiter: give the last word one to end on
            end = np.full((1, x.shape[1]), IMPOSSIBLE, np.float32)
            end[0, self.sil] = 0.0
            x = np.concatenate([x, end])
        x = np.ascontiguousarray(x, np.float32)
        results = self._decoder.decode(x.ctypes.data, x.shape[0], x.shape[1])
        # flashlight pads one frame each side
        paths = [(np.asarray(r.tokens, np.int64)[1:-1], np.asarray(r.words, np.int64)[1:-1]) for r in results]
        if not self.lexicon_mode:
            return paths[0][0], []
        # The best hypothesis whose last word is finished (it took the appended delimiter). When the
        # whole beam is inside an unfinished word (noise can push every finished one past the beam
        # threshold), the best one's unfinished letters are dropped: they spell no lexicon word.
        finished = [(p, w) for p, w in paths if p[n] == self.sil]
        if finished:
            path, words = finished[0][0][:n], finished[0][1][:n]
        else:
            path, words = paths[0][0][:n].copy(), paths[0][1][:n]
            breaks = np.flatnonzero(path == self.sil)
            path[breaks[-1] + 1 if len(breaks) else 0 :] = self.blank
        path = self._one_break_between_words(path)
        return path, self._missing_breaks(path, np.flatnonzero(words == self.unk_word))

    def _missing_breaks(self, path: np.ndarray, unknown_ends: np.ndarray) -> list[int]:
        """Frames after which an unknown word ends with no delimiter before the next word's letters.

        flashlight ends an unknown word on one of its letters (a lexicon word ends on its
        delimiter), and the next word may follow with no delimiter between; the text needs a break
        there. A CTC repeat of the same letter in the next frame is the same letter, not a new word.
        """
        out = []
        for t in unknown_ends:
            later = np.flatnonzero(path[t + 1 :] != self.blank)
            if not len(later):
                continue
            j = t + 1 + later[0]
            if path[j] == self.sil or (j == t + 1 and path[j] == path[t]):
                continue
            out.append(int(t) + 1)
        return out

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
        """Best beam's text and word frame offsets, by the same rules as greedy decoding.

        A word break missing after an unknown word is put in as one extra delimiter frame; the
        offsets are then given back in the frames of `log_probs`.
        """
        path, breaks = self._best(log_probs)
        if not breaks:
            return self.tokenizer.decode(path, skip_special_tokens, output_word_offsets=True)
        text, words = self.tokenizer.decode(
            np.insert(path, breaks, self.sil), skip_special_tokens, output_word_offsets=True
        )
        inserted = np.asarray(breaks) + np.arange(len(breaks))  # their frames in the lengthened path

        def back(frame: int) -> int:
            return frame - int(np.searchsorted(inserted, frame))

        return text, [WordOffset(w.word, back(w.start_offset), back(w.end_offset)) for w in words]


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
        `attrs.json` settings; lm_weight/word_score override alpha/beta), if it has one; False = no LM.
    beam_width: 0 or 1 = greedy unless an LM is used (then `DEFAULT_LM_BEAM_WIDTH`).
    """
    if beam_width < 0:
        raise D2VError(f"--beam-width: must be >= 0, got {beam_width}")
    unigrams, pyctcdecode = None, {}
    if lm is None and model_dir is not None:
        hf = find_hf_language_model(model_dir)
        if hf is not None:
            require_flashlight(f"{hf.path}: the model's language model (pass --no-lm to decode without it)")
            lm, unigrams = hf.path, hf.unigrams
            lm_weight = hf.lm_weight if lm_weight is None else lm_weight
            word_score = hf.word_score if word_score is None else word_score
            attrs = hf.path.parent / "attrs.json"
            pyctcdecode = dict(
                unk_score_offset=hf.unk_score_offset, score_boundary=hf.score_boundary, settings=str(attrs)
            )
            if warn is not None:
                warn(
                    f"decoding with the model's language model {hf.path} (lm_weight {lm_weight:.4g} = alpha "
                    f"{hf.alpha:g} x ln 10, word_score {word_score:g} = beta, unk_score_offset "
                    f"{hf.unk_score_offset:g}, score_boundary {str(hf.score_boundary).lower()}); --no-lm decodes "
                    "without it"
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
        **pyctcdecode,
    )
