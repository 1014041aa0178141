"""Synthesise the offline toy corpus: generated English sentences spoken by flite and espeak-ng voices.

    apt-get install -y flite espeak-ng
    python data/make_toy_corpus.py --out data/toy_corpus            # ~19k utterances, ~10 min on 2 cores

Writes 16 kHz mono WAVs under OUT/wav/SPEAKER/ and one JSONL manifest per split
(OUT/train.jsonl, OUT/test_seen.jsonl, OUT/test_unseen.jsonl), one utterance a line:
    {"id", "audio", "text", "speaker", "phonemes", "seconds"}
`audio` is relative to the manifest's folder. `phonemes` is espeak-ng's phonemisation of `text`
(en-us, ASCII phoneme names): phonemes separated by spaces, words by " | " — design.md found letters
too hard to align at toy scale. Splits: `train`; `test_seen` (sentences never in train, seen
speakers); `test_unseen` (sentences never in train, two speakers never in train).
Re-running skips WAVs that already exist, so an interrupted build resumes.
"""
import argparse
import json
import os
import random
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000

# name -> command that writes a WAV of `text` to `path`. Design.md: these voices are ~9 speakers that
# Resemblyzer tells apart; espeak-ng's accents alone all sound like one speaker, its variants do not.
VOICES = {
    "awb": ["flite", "-voice", "awb"],
    "rms": ["flite", "-voice", "rms"],
    "slt": ["flite", "-voice", "slt"],
    "slt_high": ["flite", "-voice", "slt", "--setf", "int_f0_target_mean=220"],
    "kal16": ["flite", "-voice", "kal16"],
    "en_us_f2": ["espeak-ng", "-v", "en-us+f2"],
    "en_gb_m7": ["espeak-ng", "-v", "en-gb-x-rp+m7"],
    "en_us_m3": ["espeak-ng", "-v", "en-us+m3"],
}
UNSEEN = ("kal16", "en_gb_m7")  # one flite and one espeak voice, never in train

# --- a small grammar and word list of our own --------------------------------------------------------
W = {
    "det": "the a this that every one some".split(),
    "det_pl": "the some many few two three four five six seven eight nine ten these those".split(),
    "adj": """old young small big tall short happy quiet loud bright dark warm cold green red blue
        yellow brown white black soft hard clever brave gentle busy lazy strange famous tiny heavy
        light fresh sweet bitter careful curious friendly hungry sleepy noisy silver golden wooden
        ancient modern simple early late rapid slow""".split(),
    "noun": """cat dog bird horse farmer teacher doctor child baker sailor painter driver singer
        student captain king queen fox rabbit river garden window table letter basket bottle
        candle hammer kettle ladder mirror pencil pocket rocket saddle ticket tower village
        forest island mountain valley castle bridge harbor market station kitchen library
        morning evening winter summer story song picture engine wagon lantern blanket carpet
        pumpkin apple orange lemon cookie sandwich violin guitar drum whistle""".split(),
    "name": """anna peter lucy martin oliver sofia daniel emma thomas clara henry nora victor
        julia oscar helen simon grace""".split(),
    "verb_t": """found carried painted opened closed washed watched followed pushed pulled lifted
        dropped cleaned fixed built bought sold brought taught visited helped called showed
        moved filled counted tasted touched wrapped chased guarded borrowed repaired""".split(),
    "verb_i": """laughed smiled waited slept danced jumped listened walked arrived shouted
        whispered rested travelled wandered hurried stayed worked played sang""".split(),
    "adv": """quickly slowly quietly loudly happily gently carefully suddenly again yesterday
        today outside inside early later""".split(),
    "prep": "near behind under above beside inside across through toward past".split(),
    "conj": "and but while because".split(),
}
PLURAL_EXCEPTIONS = {"child": "children", "fox": "foxes", "box": "boxes", "sandwich": "sandwiches",
                     "candle": "candles", "city": "cities"}


def plural(noun):
    return PLURAL_EXCEPTIONS.get(noun, noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s"))


def noun_phrase(rng):
    r = rng.random()
    if r < 0.15:
        return [rng.choice(W["name"])]
    adjs = rng.sample(W["adj"], k=rng.choice([0, 1, 1, 2]))
    if r < 0.45:
        return [rng.choice(W["det_pl"])] + adjs + [plural(rng.choice(W["noun"]))]
    det = rng.choice(W["det"])
    if det == "a" and (adjs or [rng.choice(W["noun"])])[0][0] in "aeiou":
        det = "an"
    return [det] + adjs + [rng.choice(W["noun"])]


def clause(rng):
    words = noun_phrase(rng)
    if rng.random() < 0.6:
        words += [rng.choice(W["verb_t"])] + noun_phrase(rng)
    else:
        words += [rng.choice(W["verb_i"])]
    if rng.random() < 0.4:
        words += [rng.choice(W["prep"])] + noun_phrase(rng)
    if rng.random() < 0.3:
        words += [rng.choice(W["adv"])]
    return words


def sentence(rng, min_words=5, max_words=12):
    """One sentence of 5-12 words; `an` before vowels; drawn until it fits the length range."""
    while True:
        words = clause(rng)
        if len(words) < 7 and rng.random() < 0.5:
            words += [rng.choice(W["conj"])] + clause(rng)
        if min_words <= len(words) <= max_words:
            return " ".join(words)


def phonemise(text):
    """espeak-ng's en-us phonemes of `text` as 'p p p | p p | ...' (ASCII phoneme names, stress marks kept)."""
    out = subprocess.run(["espeak-ng", "-q", "-x", "--sep=_", "-v", "en-us", text],
                         check=True, capture_output=True, text=True).stdout
    return " | ".join(" ".join(p for p in w.split("_") if p) for w in out.split())


def synthesise(job):
    """Write one utterance's 16 kHz WAV (skipped if it exists) and return its manifest row."""
    utt_id, speaker, text, wav_path, rel_path = job
    if not os.path.exists(wav_path):
        with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
            cmd = VOICES[speaker]
            if cmd[0] == "flite":
                cmd = cmd + ["-t", text, "-o", tmp.name]
            else:
                cmd = cmd + ["-w", tmp.name, text]
            subprocess.run(cmd, check=True, capture_output=True)
            wav, sr = sf.read(tmp.name, dtype="float32")
        if sr != SAMPLE_RATE:  # espeak-ng writes 22.05 kHz
            import torch
            import torchaudio
            torch.set_num_threads(1)
            wav = torchaudio.functional.resample(torch.from_numpy(wav), sr, SAMPLE_RATE).numpy()
        wav = np.clip(wav, -1.0, 1.0)
        os.makedirs(os.path.dirname(wav_path), exist_ok=True)
        sf.write(wav_path + ".part.wav", wav, SAMPLE_RATE, subtype="PCM_16")
        os.replace(wav_path + ".part.wav", wav_path)  # atomic: a killed run leaves no half file
    seconds = sf.info(wav_path).frames / SAMPLE_RATE
    return {"id": utt_id, "audio": rel_path, "text": text, "speaker": speaker,
            "phonemes": phonemise(text), "seconds": round(seconds, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/toy_corpus")
    ap.add_argument("--train_per_speaker", type=int, default=3000)
    ap.add_argument("--test_per_speaker", type=int, default=60, help="test_seen utterances per seen speaker")
    ap.add_argument("--unseen_per_speaker", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args()
    from tqdm import tqdm

    rng = random.Random(args.seed)
    seen = [s for s in VOICES if s not in UNSEEN]
    n_train = args.train_per_speaker * len(seen)
    n_test = args.test_per_speaker * len(seen) + args.unseen_per_speaker * len(UNSEEN)
    # One pool of distinct sentences; the test sentences are drawn first and never reach train.
    pool, seen_texts = [], set()
    while len(pool) < n_train + n_test:
        s = sentence(rng)
        if s not in seen_texts:
            seen_texts.add(s)
            pool.append(s)
    test_texts, train_texts = pool[:n_test], pool[n_test:]

    splits = {"train": [], "test_seen": [], "test_unseen": []}
    for i, text in enumerate(train_texts):
        splits["train"].append((seen[i % len(seen)], text))
    k = args.test_per_speaker * len(seen)
    for i, text in enumerate(test_texts[:k]):
        splits["test_seen"].append((seen[i % len(seen)], text))
    for i, text in enumerate(test_texts[k:]):
        splits["test_unseen"].append((UNSEEN[i % len(UNSEEN)], text))

    os.makedirs(args.out, exist_ok=True)
    with ProcessPoolExecutor(args.workers) as pool_ex:
        for split, items in splits.items():
            jobs = []
            for i, (speaker, text) in enumerate(items):
                utt_id = f"{split}_{speaker}_{i:05d}"
                rel = os.path.join("wav", speaker, utt_id + ".wav")
                jobs.append((utt_id, speaker, text, os.path.join(args.out, rel), rel))
            rows = list(tqdm(pool_ex.map(synthesise, jobs, chunksize=16), total=len(jobs), desc=split))
            tmp = os.path.join(args.out, split + ".jsonl.tmp")
            with open(tmp, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
            os.replace(tmp, os.path.join(args.out, split + ".jsonl"))
            hours = sum(r["seconds"] for r in rows) / 3600
            print(f"{split}: {len(rows)} utterances, {hours:.2f} h, speakers {sorted({r['speaker'] for r in rows})}")


if __name__ == "__main__":
    main()
