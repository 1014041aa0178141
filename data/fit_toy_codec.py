"""Fit the toy mel-RVQ codec on training audio and measure its layout.

    python data/fit_toy_codec.py data/toy_corpus/train.jsonl data/toy/codec.pt              # ~2 min
    python data/fit_toy_codec.py data/toy_corpus/train.jsonl /tmp/c.pt --card 1024 256 256 256 256 256 256 256 \
        --no-cmn --probe data/toy_corpus/dev_seen.jsonl                                     # compare layouts

Prints, on --eval_manifest (default: the first 200 lines of dev_seen beside the train manifest), the log-mel
distance of each prefix of layers (the codes alone, before Griffin-Lim). With --probe it also trains a small
frame classifier per upper layer j -- inputs: the codes of layers < j in a +-3 frame window plus the speaker,
roughly what a NAR sees -- and reports its held-out cross-entropy against the layer's code entropy (how much
of the layer is predictable) and the log-mel distance when its guesses replace the true layers 2..Q
(does a NAR-like predictor improve on layer 1 alone?).
"""
import argparse
import json
import math
import os
import sys

import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from codec import MelRVQCodec, log_mel_distance  # noqa: E402
from tokenize_corpus import read_manifest  # noqa: E402


def load_audio(manifest, limit, desc):
    root = os.path.dirname(os.path.abspath(manifest))
    rows = read_manifest(manifest)[:limit]
    out = []
    for r in tqdm(rows, desc=desc):
        wav, sr = sf.read(os.path.join(root, r["audio"]), dtype="float32")
        out.append((torch.from_numpy(wav), sr, r["speaker"]))
    return out


def prefix_distances(codec, audio):
    """Mean log-mel distance of the decoded codes, for prefixes 1..Q of the layers."""
    dist = [0.0] * codec.n_q
    for wav, sr, _ in audio:
        ref, codes = codec.log_mel(wav, sr), codec.encode(wav, sr)
        for q in range(codec.n_q):
            dist[q] += log_mel_distance(codec.decode_log_mel(codes[: q + 1]), ref) / len(audio)
    return dist


class Probe(nn.Module):
    """Predicts layer j at frame t from layers < j at frames t-3..t+3 and the speaker."""

    def __init__(self, cards, j, n_spk, width=7, d=64):
        super().__init__()
        self.emb = nn.ModuleList(nn.Embedding(c, d) for c in cards[:j])
        self.spk = nn.Embedding(n_spk, d)
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(d * (width + 1), 512), nn.GELU(), nn.Linear(512, cards[j]))

    def forward(self, codes, spk):  # codes [q<j, T] of one utterance -> logits [T, card_j]
        h = sum(e(c) for e, c in zip(self.emb, codes))  # [T, d]
        pad = self.width // 2
        h = F.pad(h.T, (pad, pad)).T.unfold(0, self.width, 1).flatten(1)  # [T, d * width]
        return self.mlp(torch.cat([h, self.spk(spk).expand(h.shape[0], -1)], 1))


def probe(codec, train, test, steps=1500, seed=0):
    torch.manual_seed(seed)
    speakers = sorted({s for *_, s in train + test})
    enc = lambda audio: [(codec.encode(w, sr), torch.tensor(speakers.index(s))) for w, sr, s in audio]
    train_c, test_c = enc(train), enc(test)
    refs = [codec.log_mel(w, sr) for w, sr, _ in test]
    guessed = [c[:1].clone() for c, _ in test_c]  # golden layer 1, then the probe's guesses, layer by layer
    report = []
    for j in range(1, codec.n_q):
        model = Probe(codec.card, j, len(speakers))
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for step in range(steps):
            c, s = train_c[step % len(train_c)]
            loss = F.cross_entropy(model(c[:j], s), c[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            ce = sum(F.cross_entropy(model(c[:j], s), c[j], reduction="sum") for c, s in test_c)
            frames = sum(c.shape[1] for c, _ in test_c)
            counts = torch.bincount(torch.cat([c[j] for c, _ in train_c]), minlength=codec.card[j]).float() + 1
            p = counts / counts.sum()
            h = -sum(p[c[j]].log().sum() for c, _ in test_c)  # code entropy (unigram, held out)
            for i, (c, s) in enumerate(test_c):
                guessed[i] = torch.cat([guessed[i], model(guessed[i], s).argmax(1, keepdim=True).T])
        dist = sum(log_mel_distance(codec.decode_log_mel(g), r) for g, r in zip(guessed, refs)) / len(refs)
        row = {"layer": j + 1, "entropy_bits": h.item() / frames / math.log(2),
               "probe_ce_bits": ce.item() / frames / math.log(2), "logmel_dist_guessed": dist}
        print(json.dumps(row))
        report.append(row)
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("train_manifest")
    ap.add_argument("out")
    ap.add_argument("--card", type=int, nargs="+", default=[1024, 256, 256, 256, 256, 256, 256, 256])
    ap.add_argument("--no-cmn", dest="cmn", action="store_false", help="layer 1 clusters raw frames")
    ap.add_argument("--n_mels", type=int, default=80, help="mel bins")
    ap.add_argument("--envelope", type=int, default=0,
                    help="layer 1 picks codes by the first K mel-cosines only (a pitch-free envelope); 0: off")
    ap.add_argument("--fit_utts", type=int, default=3000, help="training utterances used for k-means")
    ap.add_argument("--extra", default=None, metavar="MANIFEST",
                    help="fitting-only audio added as it is, e.g. the corpus's codec_fit.jsonl (espeak-ng voices)")
    ap.add_argument("--tape", type=float, nargs="+", default=[],
                    help="fitting only: utterance i is also heard played at speed tape[i %% len(tape)] (pitch and "
                         "formants scale with it), so the codebooks cover more voices than the training speakers")
    ap.add_argument("--eval_manifest", default=None)
    ap.add_argument("--eval_utts", type=int, default=200)
    ap.add_argument("--probe", action="store_true", help="also run the NAR-like predictability probe")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    train = load_audio(args.train_manifest, args.fit_utts, "read train audio")
    fit = [(w, sr) for w, sr, _ in train]
    # a tape played at speed f: the samples are read as if recorded at f * sr (MelRVQCodec resamples)
    fit += [(w, round(sr * args.tape[i % len(args.tape)])) for i, (w, sr, _) in enumerate(train)] if args.tape else []
    fit += [(w, sr) for w, sr, _ in load_audio(args.extra, None, "read extra audio")] if args.extra else []
    codec = MelRVQCodec.fit(fit, card=tuple(args.card), cmn=args.cmn,
                            n_mels=args.n_mels, envelope=args.envelope, seed=args.seed, progress=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    codec.save(args.out)
    print(f"saved {codec.name} to {args.out}")
    eval_manifest = args.eval_manifest or os.path.join(os.path.dirname(args.train_manifest), "dev_seen.jsonl")
    test = load_audio(eval_manifest, args.eval_utts, "read eval audio")
    dist = prefix_distances(codec, test)
    print("log-mel distance by layers kept:", " ".join(f"{q + 1}:{d:.3f}" for q, d in enumerate(dist)))
    result = {"codec": codec.name, "card": args.card, "cmn": args.cmn, "n_mels": args.n_mels, "envelope": args.envelope,
              "fit_utts": args.fit_utts, "tape": args.tape, "extra": args.extra, "eval_manifest": eval_manifest,
              "prefix_logmel_dist": dist}
    if args.probe:
        result["probe"] = probe(codec, train[:1500], test)
    with open(os.path.splitext(args.out)[0] + ".layout.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
