"""Measure the toy codec with the offline judges: WER (Whisper tiny.en) and SIM (Resemblyzer) of the
original test audio, of the unquantised log-mel through the codec's vocoder ("mel": what the vocoder alone
loses) and of its resynthesis from 1, 2, 4 and all layers.

    python data/measure_codec.py data/toy_corpus/test_seen.jsonl data/toy/codec.pt --limit 150 --out seen.json

--vocoder is eval.py's: "auto" (the default) and "source_filter" decode with the source-filter decoder at the pitch
the codes of the prompt utterance carry (MelRVQCodec.prompt_f0), as evaluation does; "griffin_lim" inverts the
log-mel with Griffin-Lim, as every measurement before the source-filter decoder did.

WER is corpus-level on normalised text (metrics.NORMALIZATION). SIM is the cosine of Resemblyzer embeddings
between the audio and a *different* original utterance of the same speaker (the prompt-style SIM used in
evaluation), and, for resynthesis, also against its own original. "chance" scores the original audio's
transcripts against a shuffled list of references: the WER of speech that says the wrong sentence.
"""
import argparse
import json
import os
import random
import sys

import soundfile as sf
import torch
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from codec import VOCODERS, MelRVQCodec, choose_vocoder, write_text  # noqa: E402
from metrics import corpus_wer, cosine, load_asr, load_speaker_encoder, speaker_embedding, transcribe  # noqa: E402
from tokenize_corpus import read_manifest  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest")
    ap.add_argument("codec")
    ap.add_argument("--limit", type=int, default=None, help="first N utterances of the manifest")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: 1 2 4 ... n_q")
    ap.add_argument("--out", required=True, help="JSON with totals and per-utterance results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocoder", choices=VOCODERS, default="auto", help="the decoder of 'mel' and the resyntheses")
    args = ap.parse_args()
    torch.set_num_threads(1)

    codec = MelRVQCodec.load(args.codec)
    vocoder = choose_vocoder(codec, args.vocoder)
    layers = args.layers or sorted({q for q in (1, 2, 4, 8) if q < codec.n_q} | {codec.n_q})
    rows = read_manifest(args.manifest)
    root = os.path.dirname(os.path.abspath(args.manifest))
    rng = random.Random(args.seed)
    by_spk = {}
    for r in rows:
        by_spk.setdefault(r["speaker"], []).append(r)
    rows = rows[: args.limit]
    asr, enc = load_asr(), load_speaker_encoder()
    emb_cache = {}

    def original(row):
        wav, sr = sf.read(os.path.join(root, row["audio"]), dtype="float32")
        return torch.from_numpy(wav), sr

    def emb(row):
        if row["id"] not in emb_cache:
            emb_cache[row["id"]] = speaker_embedding(enc, *original(row))
        return emb_cache[row["id"]]

    f0_cache = {}

    def pitch(row):  # a prompt serves several utterances: its Griffin-Lim decoding is done once
        if row["id"] not in f0_cache:
            f0_cache[row["id"]] = codec.prompt_f0(codec.encode(*original(row)))
        return f0_cache[row["id"]]

    systems = ["original", "mel"] + [f"codec_{q}" for q in layers]
    hyps = {s: [] for s in systems}
    sims = {s: [] for s in systems}
    sims_self = {s: [] for s in systems[1:]}
    per_utt, seconds = [], []  # seconds: each utterance's duration, which bounds its transcripts (corpus_wer)
    for row in tqdm(rows, desc=os.path.basename(args.manifest)):
        prompt = rng.choice([r for r in by_spk[row["speaker"]] if r["id"] != row["id"]])
        wav, sr = original(row)
        seconds.append(wav.shape[-1] / sr)
        codes = codec.encode(wav, sr)
        # the pitch the decoder speaks at comes from the prompt's codes, not from this utterance: as in evaluation
        f0 = pitch(prompt) if vocoder == "source_filter" else None
        item = {"id": row["id"], "prompt": prompt["id"], "f0": f0}
        for s in systems:
            if s == "original":
                audio = (wav, sr)
            elif s == "mel":
                audio = codec.vocode(codec.log_mel(wav, sr), f0)
            else:
                audio = codec.decode(codes[: int(s.split("_")[1])], f0=f0)
            hyps[s].append(transcribe(asr, *audio))
            e = emb(row) if s == "original" else speaker_embedding(enc, *audio)
            sims[s].append(cosine(e, emb(prompt)))
            if s != "original":
                sims_self[s].append(cosine(e, emb(row)))
            item[s] = {"hyp": hyps[s][-1], "sim": sims[s][-1]}
        per_utt.append(item)

    refs = [r["text"] for r in rows]
    shuffled = refs[1:] + refs[:1]  # every transcript scored against another utterance's sentence
    result = {"manifest": args.manifest, "codec": codec.name, "vocoder": vocoder, "n_utts": len(rows), "systems": {}}
    for s in systems:
        result["systems"][s] = {"wer": corpus_wer(refs, hyps[s], seconds)["wer"],
                                "sim_prompt": sum(sims[s]) / len(rows)}
        if s != "original":
            result["systems"][s]["sim_own_original"] = sum(sims_self[s]) / len(rows)
    result["systems"]["chance"] = {"wer": corpus_wer(shuffled, hyps["original"], seconds)["wer"]}
    result["per_utterance"] = per_utt
    write_text(args.out, json.dumps(result, indent=1))  # atomic: an interrupted run leaves no half file
    for s, m in result["systems"].items():
        print(f"{s:>10}: " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))


if __name__ == "__main__":
    main()
