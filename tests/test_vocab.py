"""The transcript normalisation rule, the HF-style vocabulary, and its round trip through transformers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from flax_d2v.errors import D2VError
from flax_d2v.train import vocab as V

# facebook/data2vec-audio-base-960h's vocab.json (LibriSpeech letters, upper case).
HF_BASE_960H_VOCAB = {
    "<pad>": 0,
    "<s>": 1,
    "</s>": 2,
    "<unk>": 3,
    "|": 4,
    "E": 5,
    "T": 6,
    "A": 7,
    "O": 8,
    "N": 9,
    "I": 10,
    "H": 11,
    "S": 12,
    "R": 13,
    "D": 14,
    "L": 15,
    "U": 16,
    "M": 17,
    "W": 18,
    "C": 19,
    "F": 20,
    "G": 21,
    "Y": 22,
    "P": 23,
    "B": 24,
    "V": 25,
    "K": 26,
    "'": 27,
    "X": 28,
    "J": 29,
    "Q": 30,
    "Z": 31,
}


def real_transcripts(speech_dir) -> list[str]:
    lines = (speech_dir / "transcripts.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    col = header.index("text")
    return [row.split("\t")[col] for row in lines[1:] if row.split("\t")[col]]


def test_normalize_real_transcripts(speech_dir):
    texts = real_transcripts(speech_dir)
    assert len(texts) == 14
    norm = {t: V.normalize_transcript(t) for t in texts}
    # ARCTIC prompts carry case and punctuation; LibriVox/cards transcripts are lower case.
    assert norm["He turned sharply, and faced Gregson across the table."] == (
        "HE TURNED SHARPLY AND FACED GREGSON ACROSS THE TABLE"
    )
    assert norm["And you always want to see it in the superlative degree."] == (
        "AND YOU ALWAYS WANT TO SEE IT IN THE SUPERLATIVE DEGREE"
    )
    assert norm["ten of clubs"] == "TEN OF CLUBS"
    for n in norm.values():
        assert n == n.strip() and "  " not in n
        assert set(n) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
        assert V.normalize_transcript(n) == n  # idempotent: normalised text is a fixed point
    # Every character of these English transcripts is in the published LibriSpeech vocabulary.
    assert all(V.encode(t, HF_BASE_960H_VOCAB)[1] == 0 for t in texts)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Don\u2019t stop", "DON'T STOP"),  # typographic apostrophe -> '
        ("\ufb01ne \uff21\uff22", "FINE AB"),  # NFKC: ligature, full-width letters
        ("well-known, (really)!", "WELL KNOWN REALLY"),  # punctuation and hyphens are word breaks
        ("  tabs\tand\nnewlines  ", "TABS AND NEWLINES"),
        ("he said ' hello ''", "HE SAID HELLO"),  # apostrophe-only words are dropped
        ("the dogs' bones", "THE DOGS' BONES"),
        ("caf\u00e9 na\u0131ve stra\u00dfe", "CAF\u00c9 NAIVE STRASSE"),
        ("room 42", "ROOM 42"),  # digits are kept, not spelled out
        ("", ""),
        ("?!.", ""),
    ],
)
def test_normalize_rule(raw, expected):
    assert V.normalize_transcript(raw) == expected


def test_build_vocab_layout_and_determinism(speech_dir):
    texts = real_transcripts(speech_dir)
    vocab = V.build_vocab(texts)
    assert list(vocab)[:5] == ["<pad>", "<s>", "</s>", "<unk>", "|"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    shuffled = texts[:]
    random.Random(0).shuffle(shuffled)
    assert V.build_vocab(shuffled) == vocab  # order of transcripts does not matter
    # Characters by descending frequency, ties by code point.
    counts = {}
    for t in texts:
        for ch in V.normalize_transcript(t).replace(" ", ""):
            counts[ch] = counts.get(ch, 0) + 1
    chars = list(vocab)[5:]
    assert set(chars) == set(counts)
    assert chars == sorted(chars, key=lambda c: (-counts[c], c))
    assert chars[0] == "E"  # the most frequent English letter here too


def test_encode_decode_and_unknown_counts():
    ids, n_unk = V.encode("Hello, world! 42", HF_BASE_960H_VOCAB)
    v = HF_BASE_960H_VOCAB
    assert ids == [
        v["H"],
        v["E"],
        v["L"],
        v["L"],
        v["O"],
        v["|"],
        v["W"],
        v["O"],
        v["R"],
        v["L"],
        v["D"],
        v["|"],
        v["<unk>"],
        v["<unk>"],
    ]
    assert n_unk == 2  # the digits are not in the LibriSpeech alphabet
    assert V.decode(ids, v, group_tokens=False) == "HELLO WORLD <unk><unk>"
    # CTC greedy output: repeats collapse, blanks (<pad>) separate real doubles, | is a space.
    frames = [0, v["H"], v["H"], 0, v["E"], v["L"], 0, v["L"], v["L"], v["O"], v["|"], v["|"], 0, v["W"], 0]
    assert V.decode(frames, v) == "HELLO W"
    # As transformers: <s>/</s> stay literal, a delimiter doubled across a blank gives two spaces.
    assert V.decode([v["<s>"], v["A"], v["|"], 0, v["|"], v["B"], v["</s>"]], v) == "<s>A  B</s>"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("<unk>"), "missing special token"),
        (lambda d: d.update({"<pad>": 5, "E": 0}), "CTC blank"),
        (lambda d: d.update({"Z": 40}), "without gaps"),
    ],
)
def test_load_vocab_rejects_bad_layouts(tmp_path, mutate, message):
    d = dict(HF_BASE_960H_VOCAB)
    mutate(d)
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(d))
    with pytest.raises(D2VError, match=message) as e:
        V.load_vocab(path)
    assert str(path) in str(e.value)


def test_load_vocab_file_errors(tmp_path):
    with pytest.raises(D2VError, match="no such file"):
        V.load_vocab(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(D2VError, match="bad.json: not valid JSON"):
        V.load_vocab(bad)
    V.save_tokenizer_files(tmp_path / "tok", HF_BASE_960H_VOCAB)
    assert V.load_vocab(tmp_path / "tok") == HF_BASE_960H_VOCAB  # a directory holding vocab.json


def test_files_written_atomically(tmp_path):
    names = V.save_tokenizer_files(tmp_path, HF_BASE_960H_VOCAB) + [V.save_preprocessor_config(tmp_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporary files left behind
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert pre == {
        "do_normalize": True,
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "padding_side": "right",
        "padding_value": 0.0,
        "processor_class": "Wav2Vec2Processor",
        "return_attention_mask": True,
        "sampling_rate": 16000,
    }


@pytest.mark.parametrize("which", ["built", "hf_base_960h"])
def test_transformers_tokenizer_round_trip(tmp_path, speech_dir, which):
    transformers = pytest.importorskip("transformers")
    texts = real_transcripts(speech_dir) + ["Zebra-quiz: 42 jumps", "x\u00e9"]
    vocab = V.build_vocab(texts[:14]) if which == "built" else HF_BASE_960H_VOCAB
    V.save_tokenizer_files(tmp_path, vocab)
    V.save_preprocessor_config(tmp_path)
    tok = transformers.Wav2Vec2CTCTokenizer.from_pretrained(tmp_path)
    proc = transformers.Wav2Vec2Processor.from_pretrained(tmp_path)
    assert tok.get_vocab() == vocab and tok.pad_token_id == 0 and tok.word_delimiter_token == "|"
    fe = proc.feature_extractor
    assert (fe.do_normalize, fe.return_attention_mask, fe.sampling_rate, fe.padding_value) == (True, True, 16000, 0.0)
    for t in texts:
        ours, _ = V.encode(t, vocab)
        assert tok(V.normalize_transcript(t)).input_ids == ours, t
        assert proc.tokenizer(V.normalize_transcript(t)).input_ids == ours, t
        assert tok.decode(ours, group_tokens=False) == V.decode(ours, vocab, group_tokens=False), t
    # Greedy-CTC-like id sequences (runs, blanks, delimiters, unknowns) decode identically.
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, len(vocab), size=int(rng.integers(1, 40)))
        ids = np.repeat(ids, rng.integers(1, 3, size=ids.size)).tolist()
        assert tok.decode(ids) == V.decode(ids, vocab), ids
