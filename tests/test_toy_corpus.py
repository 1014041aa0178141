"""The toy corpus's text side (data/make_toy_corpus.py): phonemes, the sentence grammar, the splits and the voices.
The full script end to end is in test_data.py."""
import argparse
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data"))
import make_toy_corpus as mtc  # noqa: E402
from speechalign import TextTokenizer  # noqa: E402

requires_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                     reason="needs espeak-ng (apt-get install espeak-ng)")
requires_voices = pytest.mark.skipif(
    not (shutil.which("flite") and shutil.which("text2wave")),
    reason="needs flite and festival (apt-get install flite festival festvox-kdlpc16k)")
# Written by hand from espeak-ng's phoneme names; stress marks are tokens of their own.
EXPECTED = {
    "measure": "m ' E Z 3",
    "boy": "b ' OI",
    "hire": "h ' aI3",  # aI3 (as in fire) is one phoneme, not aI + 3
    "radio": "r ' eI d I2 ; , oU",  # secondary stress; ';' is a phoneme espeak-ng writes between vowels
    "button": "b ' V ? n-",  # glottal stop, syllabic n
    "national": "n ' a S @- n @L",
    # one group per word, although espeak-ng alone writes "there was" and "in the" as one word each
    "there was a cat in the garden": "D e@ | w V z | a# | k ' a t | I n | D @2 | g ' A@ d @ n",
}


def default_args(**kw):
    args = dict(seed=0, train_per_speaker=3000, dev_per_speaker=40, dev_unseen_per_speaker=100, dev_oog=120,
                test_per_speaker=60, unseen_per_speaker=200, codec_fit_per_voice=50)
    return argparse.Namespace(**(args | kw))


@pytest.fixture(scope="module")
def splits():
    return mtc.make_splits(default_args())


def test_split_stress():
    assert mtc.split_stress("'aI") == ["'", "aI"] and mtc.split_stress(",i@3") == [",", "i@3"]
    assert mtc.split_stress("t#") == ["t#"] and mtc.split_stress("@L") == ["@L"] and mtc.split_stress(";") == [";"]


@requires_espeak
@pytest.mark.parametrize("text", EXPECTED)
def test_phonemise_splits_stress_and_keeps_phonemes_whole(text):
    assert mtc.phonemise(text) == EXPECTED[text]


def test_sentences_are_deterministic_and_use_only_the_listed_words():
    for g in (mtc.W, mtc.OOG):
        vocab, rng = mtc.vocabulary(g), random.Random(0)
        sentences = [mtc.sentence(rng, g) for _ in range(3000)]
        assert sentences == [mtc.sentence(r, g) for r in [random.Random(0)] for _ in range(3000)]
        assert all(5 <= len(s.split()) <= 12 for s in sentences)
        used = {w for s in sentences for w in s.split()}
        assert used <= vocab, sorted(used - vocab)[:10]
    assert len(mtc.vocabulary()) > 1500  # words of the training grammar, plurals and verb forms included


def test_oog_content_words_are_outside_the_training_grammar():
    new = mtc.vocabulary(mtc.OOG) - mtc.function_words()
    assert len(new) > 200 and not new & mtc.vocabulary(mtc.W)


def test_splits_are_disjoint_deterministic_and_independent_of_train_size(splits):
    texts = {s: [t for _, t in items] for s, items in splits.items()}
    assert list(splits) == ["train", "codec_fit", "dev_seen", "dev_unseen", "dev_oog", "test_seen", "test_unseen"]
    assert {s: len(t) for s, t in texts.items()} == dict(train=18000, codec_fit=1000, dev_seen=240, dev_unseen=200,
                                                          dev_oog=120, test_seen=360, test_unseen=400)
    everything = [t for ts in texts.values() for t in ts]
    assert len(set(everything)) == len(everything)  # no sentence twice, within or across splits
    seen = {"awb", "awb_high", "rms", "rms_low", "slt", "slt_high"}
    for split, items in splits.items():
        speakers = [s for s, _ in items]
        expected = {"kal16", "ked"} if split.endswith("unseen") else set(mtc.CODEC_FIT) if split == "codec_fit" else seen
        assert set(speakers) == expected and len(set(speakers.count(s) for s in expected)) == 1  # balanced
    train_vocab = mtc.vocabulary(mtc.W)
    for text in texts["dev_oog"]:
        assert not (set(text.split()) - mtc.function_words()) & train_vocab, text
    assert mtc.make_splits(default_args()) == splits
    small = mtc.make_splits(default_args(train_per_speaker=5))
    assert all(small[s] == splits[s] for s in splits if s not in ("train", "codec_fit")) and len(small["train"]) == 30
    assert mtc.make_splits(default_args(seed=1))["test_seen"] != splits["test_seen"]


def test_wav_name_changes_with_text_and_voice():
    """A resumed build skips existing WAVs: their names must say what made them, or a new grammar or voice
    setting would silently reuse audio of another sentence."""
    name = mtc.wav_name("train_awb_00000", "awb", "the cat slept")
    assert name.startswith("train_awb_00000_") and name.endswith(".wav")
    assert name == mtc.wav_name("train_awb_00000", "awb", "the cat slept")
    assert name != mtc.wav_name("train_awb_00000", "awb", "the dog slept")
    assert mtc.wav_name("x", "rms", "hi") != mtc.wav_name("x", "rms_low", "hi")  # same command, other TAPE


@requires_espeak
def test_article_before_vowel_sounds():
    """`an` exactly where espeak-ng hears a vowel first: checks the spelling rule and A_OR_AN on every word
    that can follow `a`."""
    words = sorted({w for g in (mtc.W, mtc.OOG) for k in ("person", "animal", "thing", "food", "place")
                    for w in g[k]} | {w for g in (mtc.W, mtc.OOG) for k in g if k.startswith("adj_") for w in g[k]})
    groups = mtc.phonemise(" ".join(words)).split(" | ")
    assert len(groups) == len(words)
    consonants = set("p b t t# t2 d k g f v T D s z S Z h m n N l r w j tS dZ ?".split())
    wrong = [w for w, ph in zip(words, groups)
             if (mtc.with_article(["a", w])[0] == "an") != (ph.lstrip("', ").split()[0] not in consonants)]
    assert not wrong


@requires_espeak
def test_out_of_grammar_sentences_tokenise_with_the_training_vocabulary(splits):
    """The vocabulary a model trained on this grammar has (its words, and sentences for espeak-ng's pause
    marks) reads dev_oog and other sentences made of words it never saw."""
    train = [t for _, t in splits["train"][:500]]
    tok = TextTokenizer.build([mtc.phonemise(" ".join(sorted(mtc.vocabulary()))), mtc.phonemise(". ".join(train))])
    others = ["the weather forecast predicts heavy snow this weekend",
              "my neighbor's daughter practices the trumpet every evening",
              "please remember to switch off the lights before you leave",
              "a journey of a thousand miles begins with a single step",
              "the committee postponed its decision until january",
              "we usually eat breakfast together in the kitchen",
              "his favorite hobby is collecting unusual postcards",
              "the museum closes early on public holidays"]
    texts = [t for _, t in splits["dev_oog"]] + others
    phonemes = mtc.phonemise(". ".join(texts))  # one espeak-ng call; a full stop ends a clause as a line would
    assert phonemes.count("|") == sum(len(t.split()) for t in texts) - 1
    assert not set(phonemes.split()) - set(tok.symbols)
    assert 60 <= len(tok.symbols) <= 80  # about the en-us inventory and two stress marks, not one per stress


def median_f0(path):
    import librosa

    wav, sr = sf.read(path, dtype="float32")
    f0, voiced, _ = librosa.pyin(wav, fmin=50, fmax=400, sr=sr)
    return float(np.median(f0[voiced]))


@requires_espeak
@requires_voices
def test_every_voice_speaks_and_the_pitch_variants_differ(tmp_path):
    """flite ignores some settings silently (rms has its own F0 model: int_f0_target_mean leaves it unchanged),
    so each variant must measurably move the pitch of its base voice."""
    text = "the old farmer carried a heavy basket to the market"
    f0, seconds = {}, {}
    for speaker in mtc.VOICES:
        path = str(tmp_path / f"{speaker}.wav")
        row = mtc.synthesise((speaker, speaker, text, path, path))
        assert sf.info(path).samplerate == 16000 and row["phonemes"] == mtc.phonemise(text)
        f0[speaker], seconds[speaker] = median_f0(path), row["seconds"]
    assert f0["awb_high"] > 1.15 * f0["awb"] and f0["slt_high"] > 1.15 * f0["slt"]
    assert f0["rms_low"] < 0.95 * f0["rms"]
    assert seconds["rms_low"] == pytest.approx(seconds["rms"] / mtc.TAPE["rms_low"], rel=0.01)
    assert 1.5 < seconds["ked"] < 6 and 1.5 < seconds["kal16"] < 6


def test_missing_synthesiser_is_named_before_any_work(tmp_path):
    res = subprocess.run([sys.executable, mtc.__file__, "--out", str(tmp_path / "c")], capture_output=True, text=True,
                         env=os.environ | {"PATH": str(tmp_path)})
    assert res.returncode != 0 and "espeak-ng not found: apt-get install" in res.stderr
    assert not (tmp_path / "c").exists()
