"""n-gram LM beam search (flashlight-text): greedy equivalence, LM fusion, lexicons, HF LM directories, CLI, errors.

The LMs are written here from ../shared/speech/transcripts.tsv by a small ARPA writer (bigrams with
absolute discounting and back-off), over words or over characters.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import re
import string
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import flax_d2v
from flax_d2v import Data2VecAudioForCTC, init_params, tiny_config
from flax_d2v.cli import main as d2v_main
from flax_d2v.ctc_decode import CTCTokenizer
from flax_d2v.errors import D2VError
from flax_d2v.train.vocab import normalize_transcript

VOCAB = {
    "<pad>": 0,
    "<s>": 1,
    "</s>": 2,
    "<unk>": 3,
    "|": 4,
    **{c: 5 + i for i, c in enumerate(string.ascii_uppercase + "'")},
}
DISCOUNT = 0.5  # absolute discounting of the test's bigram LM
PROB_TOL = 1e-5  # ARPA stores 6-7 significant digits; KenLM reads them as float32
LN10 = math.log(10.0)

fl = pytest.importorskip("flashlight.lib.text.decoder", reason="flashlight-text (the [lm] extra) is not installed")

from flax_d2v.lm_decode import BeamSearchDecoder, read_arpa_unigrams  # noqa: E402  (needs nothing; after the skip)


# ---------------------------------------------------------------------------------------- the test's ARPA writer
def bigram_arpa(sentences: list[list[str]], path: Path) -> dict[tuple[str, str], float]:
    """A back-off bigram LM in ARPA format; returns the log10 P(w | v) it defines for every (v, w).

    Unigrams: add-one over the words, </s> and <unk>. Bigrams seen in the data: (c(v w) - D) / c(v);
    the mass D * N1+(v) / c(v) left over goes to the unseen words in proportion to their unigram
    probability (the back-off weight), so every context's distribution sums to one.
    """
    words = sorted({w for s in sentences for w in s})
    uni_counts = Counter(w for s in sentences for w in s + ["</s>"])
    outcomes = words + ["</s>", "<unk>"]
    total = sum(uni_counts.values()) + len(outcomes)
    p1 = {w: (uni_counts[w] + 1) / total for w in outcomes}
    big = Counter((a, b) for s in sentences for a, b in zip(["<s>"] + s, s + ["</s>"], strict=True))
    ctx = Counter()
    for (a, _), c in big.items():
        ctx[a] += c
    p2 = {(a, b): (c - DISCOUNT) / ctx[a] for (a, b), c in big.items()}
    bow = {}
    for a in ctx:
        seen = [b for (x, b) in big if x == a]
        left = DISCOUNT * len(seen) / ctx[a]
        bow[a] = left / (1.0 - sum(p1[b] for b in seen))
    lines = ["\\data\\", f"ngram 1={len(outcomes) + 1}", f"ngram 2={len(p2)}", "", "\\1-grams:"]
    lines.append(f"-99\t<s>\t{math.log10(bow['<s>']):.7f}")
    for w in outcomes:
        b = f"\t{math.log10(bow[w]):.7f}" if w in bow else ""
        lines.append(f"{math.log10(p1[w]):.7f}\t{w}{b}")
    lines += ["", "\\2-grams:"] + [f"{math.log10(p):.7f}\t{a} {b}" for (a, b), p in sorted(p2.items())]
    lines += ["", "\\end\\", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    logp = {}
    for a in ["<s>"] + words:
        for b in outcomes:
            p = p2.get((a, b), bow.get(a, 1.0) * p1[b])
            logp[(a, b)] = math.log10(p)
    return logp


def transcripts(speech_dir: Path) -> list[str]:
    rows = (speech_dir / "transcripts.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [normalize_transcript(r.split("\t")[5]) for r in rows if r.strip()]


@pytest.fixture(scope="module")
def texts(speech_dir):
    return transcripts(speech_dir)


@pytest.fixture(scope="module")
def word_lm(texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "words.arpa"
    return path, bigram_arpa([t.split() for t in texts], path)


@pytest.fixture(scope="module")
def char_lm(texts, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "chars.arpa"
    bigram_arpa([list(t.replace(" ", "|")) for t in texts], path)
    return path


TOK = CTCTokenizer.from_vocab(VOCAB)


# ---------------------------------------------------------------------------------------- emissions
def emissions(
    text: str, rng: np.random.Generator, confidence: float = 0.9, ambiguous: dict[int, dict[str, float]] | None = None
) -> np.ndarray:
    """CTC log-probs that spell `text` (spaces = "|"): each character over 1-3 frames, blanks between.

    `ambiguous[i]` replaces character i's distribution (e.g. {"S": 0.45, "Z": 0.55}).
    """
    frames = []
    for i, ch in enumerate(text.replace(" ", "|")):
        dist = (ambiguous or {}).get(i, {ch: confidence})
        for _ in range(int(rng.integers(1, 4))):
            p = np.full(len(VOCAB), (1.0 - sum(dist.values())) / (len(VOCAB) - len(dist)))
            for c, q in dist.items():
                p[VOCAB[c]] = q
            frames.append(p)
        p = np.full(len(VOCAB), 0.05 / (len(VOCAB) - 1))
        p[VOCAB["<pad>"]] = 0.95
        frames.extend([p] * int(rng.integers(0, 3)))
    return np.log(np.stack(frames)).astype(np.float32)


def noisy_logits(rng: np.random.Generator, frames: int) -> np.ndarray:
    """Random CTC-like scores: smoothed over 4 frames (runs of repeats), blank-heavy, no word structure."""
    z = rng.standard_normal((frames + 3, len(VOCAB)))
    x = (z[:-3] + z[1:-2] + z[2:-1] + z[3:]) * 1.5
    x[:, VOCAB["<pad>"]] += 4.0  # ~30% blanks
    x[:, VOCAB["|"]] += 3.0  # ~15% word breaks
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------- the LM itself
def test_arpa_writer_sums_to_one_and_kenlm_reads_it(word_lm, texts):
    """The test's LM is a real distribution, and KenLM (through flashlight) scores it as written."""
    from flashlight.lib.text.dictionary import Dictionary

    from flax_d2v.lm_decode import load_kenlm

    path, logp = word_lm
    contexts = {a for a, _ in logp}
    for a in contexts:
        assert sum(10**v for (x, _), v in logp.items() if x == a) == pytest.approx(1.0, abs=1e-9)
    words = sorted({w for t in texts for w in t.split()})
    assert sorted(read_arpa_unigrams(path)) == words
    d = Dictionary(words + ["</s>", "<unk>"])
    lm = load_kenlm(path, d)
    state = lm.start(False)  # after <s>
    for w in words[:20]:
        _, score = lm.score(state, d.get_index(w))
        assert score == pytest.approx(logp[("<s>", w)], abs=PROB_TOL)
    state, _ = lm.score(state, d.get_index("HE"))
    for w in ("WAS", "HE", "MAN"):
        _, score = lm.score(state, d.get_index(w))
        assert score == pytest.approx(logp[("HE", w)], abs=PROB_TOL)


# ---------------------------------------------------------------------------------------- (a) greedy
@pytest.mark.parametrize("lm", ["none", "chars"])
def test_lexicon_free_beam_one_lm_weight_zero_is_greedy(lm, char_lm):
    rng = np.random.default_rng(0)
    kw = {} if lm == "none" else dict(lm=char_lm, lm_weight=0.0)
    decoder = BeamSearchDecoder(TOK, len(VOCAB) + 2, beam_width=1, **kw)
    assert not decoder.lexicon_mode
    for trial in range(200):
        x = noisy_logits(rng, int(rng.integers(1, 90)))
        x = np.concatenate([x, np.full((len(x), 2), -50.0, np.float32)], axis=1)  # columns past the vocab
        for skip in (False, True):
            text, words = decoder.decode(x, skip_special_tokens=skip)
            ref_text, ref_words = TOK.decode(x.argmax(-1), skip_special_tokens=skip, output_word_offsets=True)
            assert (text, words) == (ref_text, ref_words), trial


def test_char_lm_is_detected_as_lexicon_free(char_lm, word_lm):
    assert not BeamSearchDecoder(TOK, len(VOCAB), 4, lm=char_lm).lexicon_mode
    assert BeamSearchDecoder(TOK, len(VOCAB), 4, lm=word_lm[0]).lexicon_mode
    assert not BeamSearchDecoder(TOK, len(VOCAB), 4, lm=word_lm[0], lexicon_free=True).lexicon_mode  # as asked
    with pytest.raises(D2VError, match="a lexicon cannot be used with lexicon-free decoding"):
        BeamSearchDecoder(TOK, len(VOCAB), 4, lm=char_lm, lexicon=char_lm, lexicon_free=True)


def test_beam_search_without_lm_agrees_with_greedy_on_confident_logits():
    rng = np.random.default_rng(0)
    ids = noisy_logits(rng, 120).argmax(-1)
    logits = np.full((len(ids), len(VOCAB)), -8.0, np.float32)
    logits[np.arange(len(ids)), ids] = 8.0  # one path carries ~all the mass: the best beam is it
    text, words = BeamSearchDecoder(TOK, len(VOCAB), beam_width=16).decode(logits)
    assert (text, words) == TOK.decode(ids, output_word_offsets=True) and len(words) > 3


# ---------------------------------------------------------------------------------------- (b) the LM decides
@pytest.mark.parametrize("mode", ["unigrams", "chars"])
def test_lm_turns_an_ambiguous_spelling_into_the_word(mode, word_lm, char_lm, texts):
    sentence = "HE WAS NOT AN ILL DISPOSED YOUNG MAN"
    assert sentence in texts
    s_at = sentence.index("DISPOSED") + 2  # the S of DISPOSED: acoustically a little more Z than S
    x = emissions(sentence, np.random.default_rng(1), ambiguous={s_at: {"S": 0.4, "Z": 0.5}})
    wrong = sentence.replace("DISPOSED", "DIZPOSED")
    assert TOK.decode(x.argmax(-1)) == wrong
    assert BeamSearchDecoder(TOK, len(VOCAB), 50).decode(x)[0] == wrong  # no LM: the acoustics win
    lm = word_lm[0] if mode == "unigrams" else char_lm
    decoder = BeamSearchDecoder(TOK, len(VOCAB), 50, lm=lm, lm_weight=1.0, word_score=0.0)
    text, words = decoder.decode(x)
    assert text == sentence
    if mode == "unigrams":  # a gzipped ARPA file (as OpenSLR ships the 4-gram) reads the same
        import gzip

        gz = lm.parent / "words.arpa.gz"
        gz.write_bytes(gzip.compress(lm.read_bytes()))
        assert BeamSearchDecoder(TOK, len(VOCAB), 50, lm=gz, lm_weight=1.0, word_score=0.0).decode(x) == (text, words)
    assert [w.word for w in words] == sentence.split()
    # the same frames as greedy decoding: the fix does not move the words
    greedy_words = TOK.decode(x.argmax(-1), output_word_offsets=True)[1]
    assert [(w.start_offset, w.end_offset) for w in words] == [(w.start_offset, w.end_offset) for w in greedy_words]


# ---------------------------------------------------------------------------------------- (c) lexicons
def test_every_output_word_is_in_the_lexicon(word_lm, tmp_path):
    # upper and lower case, two wav2letter lexicon lines (with a spelling), a duplicate, two unspellable
    lexicon = ["THE", "and", "of", "he", "WAS", "NOT", "to t o |", "a a |", "in", "IT", "CAFÉ", "NAÏVE", "THE"]
    path = tmp_path / "words.txt"
    path.write_text("\n".join(lexicon) + "\n", encoding="utf-8")
    notes: list[str] = []
    decoder = BeamSearchDecoder(TOK, len(VOCAB), 30, lm=word_lm[0], lexicon=path, warn=notes.append, word_score=2.0)
    assert notes == [
        f"{path}: 2 of 12 words cannot be spelled with the model's vocabulary and are left out (e.g. 'CAFÉ', 'NAÏVE')",
        f"{path}: 6 of 10 words are not in {word_lm[0]} and are scored as its <unk> (e.g. 'and', 'of', 'he')",
    ]
    allowed = {w.split()[0].upper() for w in lexicon[:10]}
    rng = np.random.default_rng(3)
    seen = Counter()
    for _ in range(40):
        text, words = decoder.decode(noisy_logits(rng, int(rng.integers(20, 120))))
        assert set(text.split()) <= allowed and text == " ".join(text.split()), text
        assert [w.word for w in words] == text.split()
        seen.update(text.split())
    assert sum(seen.values()) > 40  # the decoder did write words, not empty strings


def test_unigrams_are_the_default_lexicon(word_lm, texts):
    decoder = BeamSearchDecoder(TOK, len(VOCAB), 30, lm=word_lm[0], word_score=2.0)
    vocabulary = {w for t in texts for w in t.split()}
    assert decoder.words == vocabulary
    rng = np.random.default_rng(4)
    out = [decoder.decode(noisy_logits(rng, 80))[0] for _ in range(20)]
    assert all(set(t.split()) <= vocabulary for t in out) and sum(len(t.split()) for t in out) > 20


# ---------------------------------------------------------------------------------------- models and the CLI
def tiny_ctc_with_words(seed: int = 0):
    """A tiny random CTC model whose frames decide (blank- and delimiter-heavy), as in test_transcribe."""
    module = Data2VecAudioForCTC(tiny_config(vocab_size=len(VOCAB), num_conv_pos_embeddings=5, conv_pos_kernel_size=7))
    params = init_params(module, seed)
    head = dict(params["lm_head"])
    head["kernel"] = np.asarray(head["kernel"]) * 10.0
    bias = np.zeros(len(VOCAB), np.float32)
    bias[VOCAB["<pad>"]], bias[VOCAB["|"]] = 1.0, 0.7
    head["bias"] = bias
    return module, {**params, "lm_head": head}


def hf_with_lm_dir(root: Path, model, arpa: Path, unigrams: list[str], alpha: float, beta: float) -> Path:
    """A transformers Wav2Vec2ProcessorWithLM directory: model, processor files, language_model/."""
    from flax_d2v.convert.hf import save_hf
    from flax_d2v.processor import save_preprocessor_config, save_tokenizer_files

    files = root / "files"
    files.mkdir()
    save_tokenizer_files(files, VOCAB)
    save_preprocessor_config(files)
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        cfg = json.loads((files / name).read_text())
        cfg["processor_class"] = "Wav2Vec2ProcessorWithLM"
        (files / name).write_text(json.dumps(cfg))
    labels = ["" if t == "<pad>" else " " if t == "|" else t for t in sorted(VOCAB, key=VOCAB.get)]
    (files / "alphabet.json").write_text(json.dumps({"labels": labels, "is_bpe": False}))
    lm_dir = files / "language_model"
    lm_dir.mkdir()
    (lm_dir / "attrs.json").write_text(
        json.dumps({"alpha": alpha, "beta": beta, "unk_score_offset": -10.0, "score_boundary": True})
    )
    (lm_dir / "unigrams.txt").write_text("\n".join(unigrams) + "\n")
    (lm_dir / arpa.name).write_bytes(arpa.read_bytes())
    return save_hf(root / "model", model[0].config, model[1], files_from=files)


@pytest.fixture(scope="module")
def lm_model_dir(word_lm, tmp_path_factory):
    unigrams = ["HE", "WAS", "NOT", "AN", "ILL", "DISPOSED", "YOUNG", "MAN", "AND", "THE", "A", "I", "TO", "OF"]
    return hf_with_lm_dir(
        tmp_path_factory.mktemp("hf_lm"), tiny_ctc_with_words(), word_lm[0], unigrams, alpha=0.5, beta=1.5
    ), set(unigrams)


def test_hf_processor_with_lm_dir_decodes_with_its_lm_by_default(lm_model_dir, speech_dir, capsys):
    model_dir, unigrams = lm_model_dir
    files = [str(speech_dir / "16k" / n) for n in ("librivox_0880.wav", "cards_001.wav", "forever.wav")]
    notes: list[str] = []
    with_lm = flax_d2v.transcribe(str(model_dir), files, progress=False, warn=notes.append)
    assert len(notes) == 2 and "language_model" in notes[0] and f"{0.5 * LN10:.4g}" in notes[0]
    assert "unk_score_offset -10, score_boundary true" in notes[0]
    assert notes[1].endswith(
        "unigrams.txt: 1 of 14 words are not in "
        + str(model_dir / "language_model" / "words.arpa")
        + " and are left out, as pyctcdecode leaves them out (e.g. 'I')"
    )
    greedy = flax_d2v.transcribe(str(model_dir), files, lm=False, progress=False)
    assert sum(len(r.text.split()) for r in with_lm) > 3
    for lm_r, greedy_r in zip(with_lm, greedy, strict=True):
        assert set(lm_r.text.split()) <= unigrams and lm_r.text == " ".join(lm_r.text.split())  # only LM words
        assert lm_r.text != greedy_r.text and not set(greedy_r.text.split()) <= unigrams
        assert [w.word for w in lm_r.words] == lm_r.text.split()
    # the same through the CLI: no flag = its LM; --no-lm = greedy
    assert d2v_main(["transcribe", "--model", str(model_dir), "--no-progress", *files]) == 0
    out, err = capsys.readouterr()
    assert [line.split("\t")[1] for line in out.splitlines()] == [r.text for r in with_lm]
    assert "decoding with the model's language model" in err
    assert d2v_main(["transcribe", "--model", str(model_dir), "--no-progress", "--no-lm", *files]) == 0
    out, err = capsys.readouterr()
    assert [line.split("\t")[1] for line in out.splitlines()] == [r.text for r in greedy]
    assert "language model" not in err


def test_convert_carries_language_model_both_ways(lm_model_dir, tmp_path):
    model_dir, _ = lm_model_dir
    assert d2v_main(["convert", str(model_dir), str(tmp_path / "flax")]) == 0
    assert d2v_main(["convert", "--to", "hf", str(tmp_path / "flax"), str(tmp_path / "hf")]) == 0
    for out in (tmp_path / "flax", tmp_path / "hf"):
        for name in (
            "language_model/attrs.json",
            "language_model/unigrams.txt",
            "language_model/words.arpa",
            "alphabet.json",
        ):
            assert (out / name).read_bytes() == (model_dir / name).read_bytes(), (out, name)
        assert (
            json.loads((out / "preprocessor_config.json").read_text())["processor_class"] == "Wav2Vec2ProcessorWithLM"
        )
    from flax_d2v.lm_decode import find_hf_language_model

    found = find_hf_language_model(tmp_path / "flax")
    assert found is not None and found.path.name == "words.arpa" and (found.alpha, found.beta) == (0.5, 1.5)


def test_cli_lm_lexicon_timestamps_and_json(word_lm, tmp_path, speech_dir, capfd):
    from flax_d2v.checkpoint import save_flax

    module, params = tiny_ctc_with_words()
    model_dir = save_flax(tmp_path / "ctc", module.config, params, extra_files={"vocab.json": json.dumps(VOCAB)})
    lexicon = tmp_path / "words.txt"
    lexicon.write_text("he\nwas\nnot\nan\nill\nyoung\nman\nthe\na\n", encoding="utf-8")
    files = [str(speech_dir / "16k" / n) for n in ("librivox_0880.wav", "cards_002.wav")]
    args = [
        "transcribe",
        "--model",
        str(model_dir),
        "--lm",
        str(word_lm[0]),
        "--lexicon",
        str(lexicon),
        "--lm-weight",
        "1.5",
        "--word-score",
        "2",
        "--beam-width",
        "20",
        "--no-progress",
    ]
    assert d2v_main([*args, "--timestamps", *files]) == 0
    out, err = capfd.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == files and all(set(r) == {"path", "text", "seconds", "words"} for r in rows)
    allowed = {"HE", "WAS", "NOT", "AN", "ILL", "YOUNG", "MAN", "THE", "A"}
    assert sum(len(r["words"]) for r in rows) > 2
    for r in rows:
        assert [w["word"] for w in r["words"]] == r["text"].split() and set(r["text"].split()) <= allowed
        times = [t for w in r["words"] for t in (w["start"], w["end"])]
        assert times == sorted(times) and all(w["end"] > w["start"] for w in r["words"])
        assert times[-1] <= r["seconds"] + 0.02
    assert "Reading" not in err and "****" not in err  # KenLM's loading noise stays off the terminal
    assert d2v_main([*args, "--json", *files]) == 0
    json_rows = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    assert [r["text"] for r in json_rows] == [r["text"] for r in rows]


# ---------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def ctc_dir(tmp_path_factory):
    from flax_d2v.checkpoint import save_flax

    module, params = tiny_ctc_with_words()
    return save_flax(
        tmp_path_factory.mktemp("err") / "ctc", module.config, params, extra_files={"vocab.json": json.dumps(VOCAB)}
    )


def run_cli_error(capsys, *args) -> str:
    assert d2v_main(["transcribe", "--model", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_bad_lm_files_are_one_line_errors(ctc_dir, speech_dir, tmp_path, capsys, word_lm):
    clip = str(speech_dir / "16k" / "cards_001.wav")
    missing = tmp_path / "missing.arpa"
    assert (
        run_cli_error(capsys, str(ctc_dir), "--lm", str(missing), clip)
        == f"d2v transcribe: error: {missing}: no such language model file"
    )
    garbage = tmp_path / "garbage.arpa"
    garbage.write_text("this is not\nan n-gram model\n")
    assert run_cli_error(capsys, str(ctc_dir), "--lm", str(garbage), clip).startswith(
        f"d2v transcribe: error: {garbage}: not an ARPA language model"
    )
    truncated = tmp_path / "truncated.arpa"
    truncated.write_text("\\data\\\nngram 1=40\n")
    assert f"{truncated}: " in run_cli_error(capsys, str(ctc_dir), "--lm", str(truncated), clip)
    binary = tmp_path / "lm.bin"
    binary.write_bytes(b"mmap lm http://kheafield.com/code format version 5\n\0" + bytes(range(256)) * 4)
    assert run_cli_error(capsys, str(ctc_dir), "--lm", str(binary), clip) == (
        f"d2v transcribe: error: {binary}: a KenLM binary does not list its words; give --lexicon (a word list, "
        "e.g. the LM's vocabulary) or use the ARPA file"
    )
    words = tmp_path / "words.txt"
    words.write_text("HE\nWAS\n")
    assert run_cli_error(capsys, str(ctc_dir), "--lm", str(binary), "--lexicon", str(words), clip).startswith(
        f"d2v transcribe: error: {binary}: not a KenLM language model that loads"
    )
    greek = tmp_path / "greek.txt"
    greek.write_text("ΚΑΛΗ\nΜΕΡΑ\n", encoding="utf-8")
    assert run_cli_error(capsys, str(ctc_dir), "--lm", str(word_lm[0]), "--lexicon", str(greek), clip).startswith(
        f"d2v transcribe: error: {greek}: no word can be spelled with the model's vocabulary"
    )
    assert (
        run_cli_error(capsys, str(ctc_dir), "--lexicon", str(words), clip)
        == f"d2v transcribe: error: {words}: --lexicon needs --lm (a word n-gram to score the words with)"
    )


def test_missing_extra_is_one_line_naming_the_package(ctc_dir, speech_dir, capsys, monkeypatch, word_lm, lm_model_dir):
    monkeypatch.setitem(sys.modules, "flashlight.lib.text", None)  # as if flashlight-text were not installed
    clip = str(speech_dir / "16k" / "cards_001.wav")
    line = run_cli_error(capsys, str(ctc_dir), "--lm", str(word_lm[0]), clip)
    assert (
        "flashlight-text" in line
        and "pip install 'flax-d2v[lm]'" in line
        and line.startswith("d2v transcribe: error: --lm needs")
    )
    line = run_cli_error(capsys, str(ctc_dir), "--beam-width", "8", clip)
    assert line.startswith("d2v transcribe: error: --beam-width: beam search needs the flashlight-text package")
    line = run_cli_error(capsys, str(lm_model_dir[0]), clip)
    assert line.startswith(
        f"d2v transcribe: error: {lm_model_dir[0] / 'language_model' / 'words.arpa'}: the model's "
        "language model (pass --no-lm to decode without it) needs the flashlight-text package"
    )
    # greedy needs nothing
    assert d2v_main(["transcribe", "--model", str(ctc_dir), "--no-progress", clip]) == 0
    assert d2v_main(["transcribe", "--model", str(lm_model_dir[0]), "--no-lm", "--no-progress", clip]) == 0


def test_lm_extra_installs_next_to_numpy_2():
    """flashlight-text declares no dependencies (no numpy pin) and loads under the numpy here (>= 2)."""
    assert not importlib.metadata.requires("flashlight-text")
    assert int(np.__version__.split(".")[0]) >= 2
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'lm = ["flashlight-text' in pyproject and "pyctcdecode" not in pyproject


# ---------------------------------------------------------------------------------------- fine-tuning eval
def test_finetune_eval_lm_reports_wer_beside_greedy(speech_dir, word_lm, tmp_path):
    from flax_d2v.commands.finetune import resolve
    from flax_d2v.train import finetune
    from flax_d2v.train.metrics import read_metrics

    rows = {}
    for line in (speech_dir / "transcripts.tsv").read_text().splitlines()[1:]:
        cols = line.split("\t")
        rows[Path(cols[0]).stem] = (str(speech_dir / cols[0]), cols[5])
    manifest = tmp_path / "two.tsv"
    manifest.write_text("path\ttext\n" + "".join(f"{rows[n][0]}\t{rows[n][1]}\n" for n in ("cards_001", "forever")))
    result = finetune(
        resolve(
            dict(
                train=str(manifest),
                eval=str(manifest),
                model="tiny",
                out=str(tmp_path / "run"),
                steps=1,
                batch_size=2,
                learning_rate=1e-4,
                log_every=1,
                progress=False,
                export_hf=False,
                eval_lm=str(word_lm[0]),
                eval_word_score=2.0,
            )
        )
    )
    evals = [r for r in read_metrics(tmp_path / "run") if "wer" in r]
    assert evals and {"wer", "cer", "wer_lm", "cer_lm"} <= set(evals[-1])
    assert result.last_eval["wer_lm"] == evals[-1]["wer_lm"] and 0.0 <= evals[-1]["cer_lm"]
    with pytest.raises(D2VError, match="--eval-lm needs --eval"):
        finetune(
            resolve(
                dict(
                    train=str(manifest),
                    model="tiny",
                    out=str(tmp_path / "run2"),
                    steps=1,
                    batch_size=2,
                    learning_rate=1e-4,
                    progress=False,
                    eval_lm=str(word_lm[0]),
                )
            )
        )


# ---------------------------------------------------------------------------------------- pyctcdecode's directory
def lm_only_dir(root: Path, lm_file: str, lm_bytes: bytes, unigrams: list[str], attrs: dict | None) -> Path:
    """A directory `find_hf_language_model` reads: processor_class ...WithLM and `language_model/`."""
    root.mkdir()
    (root / "preprocessor_config.json").write_text(json.dumps({"processor_class": "Wav2Vec2ProcessorWithLM"}))
    lm_dir = root / "language_model"
    lm_dir.mkdir()
    if attrs is not None:
        (lm_dir / "attrs.json").write_text(json.dumps(attrs))  # json writes -inf as -Infinity, as Python reads it
    (lm_dir / "unigrams.txt").write_text("\n".join(unigrams) + "\n")
    (lm_dir / lm_file).write_bytes(lm_bytes)
    return root


def hf_decode(model_dir: Path, x: np.ndarray, notes: list[str] | None = None) -> str:
    from flax_d2v.lm_decode import decoder_for

    decoder = decoder_for(TOK, len(VOCAB), model_dir=model_dir, warn=None if notes is None else notes.append)
    return decoder.decode(x)[0]


def test_score_boundary_scores_the_sentence_start(tmp_path):
    """score_boundary true: the first word is scored after <s> (BeginSentenceWrite); false: from no context.

    BAT starts every sentence it is in, CAT is the more frequent word: the acoustics lean to CAT
    (0.5 against 0.45), the LM's sentence start to BAT, its unigrams to CAT.
    """
    arpa = tmp_path / "bat.arpa"
    bigram_arpa([["BAT", "SAT"]] * 3 + [["THE", "CAT", "SAT"]] * 6, arpa)
    x = emissions("BAT SAT", np.random.default_rng(5), ambiguous={0: {"B": 0.45, "C": 0.5}})
    assert TOK.decode(x.argmax(-1)) == "CAT SAT"
    out = {}
    for boundary in (True, False):
        attrs = {"alpha": 0.5, "beta": 0.0, "unk_score_offset": -10.0, "score_boundary": boundary}
        d = lm_only_dir(tmp_path / f"b{boundary}", "bat.arpa", arpa.read_bytes(), ["BAT", "SAT", "THE", "CAT"], attrs)
        out[boundary] = hf_decode(d, x)
    assert out == {True: "BAT SAT", False: "CAT SAT"}


def peaky(text: str, confidence: float = 0.9) -> np.ndarray:
    """CTC log-probs as a fine-tuned model emits them: one frame per character, two blanks after each."""
    letter = np.full(len(VOCAB), (1.0 - confidence) / (len(VOCAB) - 1))
    blank = np.full(len(VOCAB), 0.05 / (len(VOCAB) - 1))
    blank[VOCAB["<pad>"]] = 0.95
    frames = []
    for ch in text.replace(" ", "|"):
        frames += [letter.copy(), blank, blank]
        frames[-3][VOCAB[ch]] = confidence
    return np.log(np.stack(frames)).astype(np.float32)


def test_unk_score_offset_lets_an_unknown_word_through(word_lm, tmp_path):
    """A finite offset writes a word outside the lexicon, at pyctcdecode's score; -inf (or null) never does.

    DISPO is no word of the LM but begins DISPOSED (flashlight's unknown words follow the lexicon's trie).
    """
    arpa, _ = word_lm
    x = peaky("HE WAS DISPO")
    unigrams = ["HE", "WAS", "NOT", "DISPOSED", "YOUNG", "MAN"]
    out = {}
    for offset in (-10.0, -math.inf, None):
        attrs = {"alpha": 0.5, "beta": 1.5, "unk_score_offset": offset, "score_boundary": True}
        d = lm_only_dir(tmp_path / f"u{offset}", "words.arpa", arpa.read_bytes(), unigrams, attrs)
        out[offset] = hf_decode(d, x)
    assert out[-10.0] == "HE WAS DISPO"
    assert out[-math.inf] == out[None] != "HE WAS DISPO"
    assert set(out[None].split()) <= set(unigrams)


def test_unknown_word_keeps_its_word_break_and_frames(word_lm):
    """An unknown word ends on its last letter; a next word right after it is still a separate word."""
    arpa, _ = word_lm
    x = peaky("HE WAS DISPO MAN")
    o = 3 * len("HE WAS DISP")  # the O of DISPO; M follows it at once, with no blank and no delimiter between
    x = np.concatenate([x[: o + 1], x[o + 6 :]])  # its blanks, the |, and the |'s blanks
    greedy_text, greedy_words = TOK.decode(x.argmax(-1), output_word_offsets=True)
    assert greedy_text == "HE WAS DISPOMAN"
    decoder = BeamSearchDecoder(TOK, len(VOCAB), 50, lm=arpa, lm_weight=1.0, word_score=1.5, unk_score_offset=-5.0)
    text, words = decoder.decode(x)
    assert text == "HE WAS DISPO MAN"
    spans = [(w.start_offset, w.end_offset) for w in words]
    assert spans[:2] == [(w.start_offset, w.end_offset) for w in greedy_words[:2]]
    assert (spans[2][0], spans[3][1]) == (greedy_words[2].start_offset, greedy_words[2].end_offset)
    assert spans[2][1] == spans[3][0] == o + 1  # the break sits between two frames: no frame is invented


def test_attrs_settings_that_cannot_be_honoured_are_refused(word_lm, char_lm, tmp_path):
    from flax_d2v.lm_decode import decoder_for

    arpa = word_lm[0].read_bytes()
    cases = {
        "yes": ({"score_boundary": "yes"}, "score_boundary must be true or false, got 'yes'"),
        "nan": ({"unk_score_offset": math.nan}, "unk_score_offset must be a finite number or -Infinity, got nan"),
        "hot": ({"hotwords": ["HE"]}, "unknown key 'hotwords' (pyctcdecode's keys are alpha, beta, unk_score_offset"),
    }
    for name, (attrs, message) in cases.items():
        d = lm_only_dir(tmp_path / name, "words.arpa", arpa, ["HE"], attrs)
        with pytest.raises(D2VError, match=re.escape(f"{d / 'language_model' / 'attrs.json'}: {message}")):
            decoder_for(TOK, len(VOCAB), model_dir=d)
    # an LM over the model's characters (lexicon-free) has no unknown-word score: a finite offset is refused
    d = lm_only_dir(tmp_path / "chars", "chars.arpa", char_lm.read_bytes(), ["H"], {"unk_score_offset": -10.0})
    with pytest.raises(D2VError, match=r"attrs.json: unk_score_offset -10 cannot be honoured with .*chars.arpa"):
        decoder_for(TOK, len(VOCAB), model_dir=d)
    d = lm_only_dir(tmp_path / "chars-off", "chars.arpa", char_lm.read_bytes(), ["H"], {"unk_score_offset": None})
    assert not decoder_for(TOK, len(VOCAB), model_dir=d).lexicon_mode


def test_language_model_file_is_found_by_its_contents(word_lm, tmp_path):
    """pyctcdecode's layout (hidden files ignored) with a gzipped ARPA file, which --lm reads too."""
    import gzip

    from flax_d2v.lm_decode import find_hf_language_model

    arpa = word_lm[0]
    x = emissions(
        "HE WAS NOT AN ILL DISPOSED YOUNG MAN", np.random.default_rng(8), ambiguous={19: {"S": 0.4, "Z": 0.5}}
    )
    unigrams = sorted(read_arpa_unigrams(arpa))
    attrs = {"alpha": 0.5, "beta": 0.0, "unk_score_offset": -10.0, "score_boundary": True}
    d = lm_only_dir(tmp_path / "gz", "5gram.arpa.gz", gzip.compress(arpa.read_bytes()), unigrams, attrs)
    (d / "language_model" / ".gitattributes").write_text("*.gz filter=lfs\n")
    assert find_hf_language_model(d).path.name == "5gram.arpa.gz"
    plain = BeamSearchDecoder(TOK, len(VOCAB), 100, lm=arpa, lm_weight=0.5 * LN10, word_score=0.0, unk_score_offset=-10)
    assert hf_decode(d, x) == plain.decode(x)[0] == "HE WAS NOT AN ILL DISPOSED YOUNG MAN"
    (d / "language_model" / "copy.arpa").write_bytes(arpa.read_bytes())
    with pytest.raises(D2VError, match=r"expected one KenLM file .* found \['5gram.arpa.gz', 'copy.arpa'\]"):
        find_hf_language_model(d)
    for name in ("5gram.arpa.gz", "copy.arpa"):
        (d / "language_model" / name).unlink()
    (d / "language_model" / "README.md").write_text("a 5-gram\n")
    with pytest.raises(D2VError, match=r"expected one KenLM file .* found none among \['README.md'\]"):
        find_hf_language_model(d)


def test_unigrams_are_filtered_by_the_lm_vocabulary(word_lm, tmp_path):
    """As pyctcdecode's _prepare_unigram_set: unigrams.txt words the LM does not know are left out, and counted."""
    arpa = word_lm[0]
    unigrams = ["HE", "WAS", "ZYZZYVA", "MAN", "QUUX"]
    d = lm_only_dir(tmp_path / "u", "words.arpa", arpa.read_bytes(), unigrams, {})
    notes: list[str] = []
    from flax_d2v.lm_decode import decoder_for

    decoder = decoder_for(TOK, len(VOCAB), model_dir=d, warn=notes.append)
    assert decoder.words == {"HE", "WAS", "MAN"}
    unigrams_txt = d / "language_model" / "unigrams.txt"
    assert notes[1] == (
        f"{unigrams_txt}: 2 of 5 words are not in {d / 'language_model' / 'words.arpa'} and are left out, "
        "as pyctcdecode leaves them out (e.g. 'QUUX', 'ZYZZYVA')"
    )
    d = lm_only_dir(tmp_path / "none", "words.arpa", arpa.read_bytes(), ["QUUX"], {})
    with pytest.raises(D2VError, match=r"unigrams.txt: none of its 1 words is in .*words.arpa"):
        decoder_for(TOK, len(VOCAB), model_dir=d)
