"""The files of n-gram LM decoding: KenLM files (ARPA, gzipped ARPA, binary), word lists, and the
`language_model/` directory of a transformers `Wav2Vec2ProcessorWithLM` checkpoint.

Kept apart from the decoder (`lm_decode.py`) because none of this needs flashlight-text: finding
and checking the files is plain Python, and the errors name the file before any LM is loaded.

A `language_model/` directory is read as pyctcdecode's `LanguageModel.load_from_dir` (what
transformers calls) reads it: hidden files are ignored, `attrs.json` holds `alpha`, `beta`,
`unk_score_offset` and `score_boundary` (no other key), `unigrams.txt` the known words, and the one
other file is the KenLM model. pyctcdecode picks that file by its suffix (`.arpa`, `.bin`,
`.binary`); here it is picked by its contents, so a gzipped ARPA file (`5gram.arpa.gz`, which KenLM
reads and `--lm` accepts) works too, and anything pyctcdecode accepts still does.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path

from flax_d2v.errors import D2VError
from flax_d2v.fileio import read_json_object
from flax_d2v.processor import processor_class

HF_ALPHA, HF_BETA = 0.5, 1.5  # pyctcdecode's defaults (constants.DEFAULT_ALPHA / DEFAULT_BETA)
HF_UNK_SCORE_OFFSET = -10.0  # pyctcdecode's DEFAULT_UNK_LOGP_OFFSET, in KenLM's log10 units
HF_SCORE_BOUNDARY = True  # pyctcdecode's DEFAULT_SCORE_LM_BOUNDARY
HF_ATTRS = ("alpha", "beta", "unk_score_offset", "score_boundary")  # pyctcdecode's LanguageModel.JSON_ATTRS
LN10 = math.log(10.0)
LM_DIR = "language_model"  # transformers' Wav2Vec2ProcessorWithLM layout
ATTRS_FILE, UNIGRAMS_FILE = "attrs.json", "unigrams.txt"
_KENLM_BINARY_MAGIC = b"mmap lm "
ARPA_SPECIALS = frozenset({"<s>", "</s>", "<unk>"})


# ---------------------------------------------------------------------------------------- KenLM files
def is_kenlm_binary(path: str | os.PathLike) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_KENLM_BINARY_MAGIC)) == _KENLM_BINARY_MAGIC


def open_text(path: Path):
    """A text reader of `path`, gunzipping when the file is gzip (by its magic bytes, not its name)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")


def is_kenlm_file(path: Path) -> bool:
    """A KenLM binary, or an ARPA file (plain or gzipped): its first non-empty line is `\\data\\`."""
    try:
        if is_kenlm_binary(path):
            return True
        with open_text(path) as f:
            for _ in range(64):  # an ARPA header is the first line; a few blank lines may precede it
                line = f.readline()
                if not line:
                    return False
                if line.strip():
                    return line.strip() == "\\data\\"
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return False
    return False


def read_arpa_unigrams(path: str | os.PathLike) -> list[str]:
    """The words of an ARPA file's `\\1-grams:` section (plain or gzipped), <s>/</s>/<unk> left out.

    Reads only up to the 2-grams, so a multi-gigabyte 4-gram costs a few seconds, not a full parse.
    """
    path = Path(path)
    words: list[str] = []
    try:
        with open_text(path) as f:
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
                    if len(parts) >= 2 and parts[1] not in ARPA_SPECIALS:
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


# ---------------------------------------------------------------------------------------- transformers' directory
@dataclass(frozen=True)
class HFLanguageModel:
    """The `language_model/` of a transformers `Wav2Vec2ProcessorWithLM` directory.

    alpha, beta, unk_score_offset, score_boundary: `attrs.json`, pyctcdecode's meaning. The
    offset is in KenLM's log10 units (pyctcdecode adds it to the LM score before weighing it by
    alpha); -inf means out-of-vocabulary words are never written.
    """

    path: Path  # the KenLM file
    unigrams: Path | None
    alpha: float
    beta: float
    unk_score_offset: float = HF_UNK_SCORE_OFFSET
    score_boundary: bool = HF_SCORE_BOUNDARY

    @property
    def lm_weight(self) -> float:
        return self.alpha * LN10  # pyctcdecode: alpha * ln(10) * log10 p = alpha * ln p

    @property
    def word_score(self) -> float:
        return self.beta


def _number(attrs_path: Path, key: str, value: object, *, allow_minus_inf: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok and (math.isfinite(value) or (allow_minus_inf and value < 0)):
        return float(value)
    also = " or -Infinity" if allow_minus_inf else ""
    raise D2VError(f"{attrs_path}: {key} must be a finite number{also}, got {value!r}")


def read_hf_attrs(attrs_path: Path) -> tuple[float, float, float, bool]:
    """(alpha, beta, unk_score_offset, score_boundary) of `attrs.json`; a missing key is pyctcdecode's default.

    A key pyctcdecode does not know is refused (pyctcdecode refuses it too), so that no setting is
    silently ignored.
    """
    attrs = read_json_object(attrs_path) if attrs_path.is_file() else {}
    unknown = sorted(set(attrs) - set(HF_ATTRS))
    if unknown:
        raise D2VError(f"{attrs_path}: unknown key {unknown[0]!r} (pyctcdecode's keys are {', '.join(HF_ATTRS)})")
    alpha = _number(attrs_path, "alpha", attrs.get("alpha", HF_ALPHA))
    beta = _number(attrs_path, "beta", attrs.get("beta", HF_BETA))
    unk = attrs.get("unk_score_offset", HF_UNK_SCORE_OFFSET)
    unk = -math.inf if unk is None else _number(attrs_path, "unk_score_offset", unk, allow_minus_inf=True)
    boundary = attrs.get("score_boundary", HF_SCORE_BOUNDARY)
    if not isinstance(boundary, bool):
        raise D2VError(f"{attrs_path}: score_boundary must be true or false, got {boundary!r}")
    return alpha, beta, unk, boundary


def find_hf_language_model(model_dir: str | os.PathLike) -> HFLanguageModel | None:
    """The LM a transformers ASR pipeline would decode this directory with, or None.

    As transformers does, only a directory whose processor_class ends in `WithLM` has one; it is
    then `language_model/` with `attrs.json`, `unigrams.txt` and one KenLM file (module docstring).
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
    # pyctcdecode's parse_directory_contents: names starting with "." or "__" are not its files
    others = sorted(
        p
        for p in lm_dir.iterdir()
        if p.is_file() and not p.name.startswith((".", "__")) and p.name not in (ATTRS_FILE, UNIGRAMS_FILE)
    )
    files = [p for p in others if is_kenlm_file(p)]
    if len(files) != 1:
        found = [p.name for p in files] if files else f"none among {[p.name for p in others]}"
        raise D2VError(
            f"{lm_dir}: expected one KenLM file (ARPA, gzipped ARPA or KenLM binary) beside {ATTRS_FILE} and "
            f"{UNIGRAMS_FILE}, found {found}"
        )
    alpha, beta, unk, boundary = read_hf_attrs(lm_dir / ATTRS_FILE)
    unigrams = lm_dir / UNIGRAMS_FILE
    return HFLanguageModel(files[0], unigrams if unigrams.is_file() else None, alpha, beta, unk, boundary)
