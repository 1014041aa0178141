"""Tests of SpeechAlign's core (speechalign.py, part 2): dpo_loss against its formulas worked by hand in plain
Python floats, the pair log-probs against a forward of each sequence alone, DPO's effect on a tiny model, and
the iterative loop (reference per round, resume, control, refusals) on a tiny checkpoint and the shipped
test_seen corpus.
"""
import json
import math
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import speechalign as sa
from codec import load_corpus

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data/toy/test_seen.pt"


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# -----------------------------------------------------------------------------------------------------------
# dpo_loss against its formulas

PC, PR, RC, RR = [-10.0, -3.0, -7.5], [-12.0, -2.0, -7.0], [-11.0, -2.5, -8.0], [-11.5, -2.5, -6.0]


def as_tensors(*lists):
    return [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in lists]


def test_dpo_loss_rewards_and_gradients_by_hand():
    beta = 0.5
    pc, pr, rc, rr = as_tensors(PC, PR, RC, RR)
    losses, r_c, r_r = sa.dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    for i in range(3):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        assert losses[i].item() == pytest.approx(-math.log(sigmoid(beta * h)), rel=1e-6)
        assert r_c[i].item() == pytest.approx(beta * (PC[i] - RC[i]), rel=1e-6)
        assert r_r[i].item() == pytest.approx(beta * (PR[i] - RR[i]), rel=1e-6)
        # d/dpc of -log sigma(beta h) = -beta (1 - sigma(beta h)); the rejected side gets the opposite sign
        assert pc.grad[i].item() == pytest.approx(-beta * (1 - sigmoid(beta * h)), rel=1e-5)
        assert pr.grad[i].item() == pytest.approx(beta * (1 - sigmoid(beta * h)), rel=1e-5)
    assert not r_c.requires_grad and not r_r.requires_grad  # rewards are reported, never trained on


def test_conservative_dpo_and_ipo_by_hand():
    beta, eps = 0.2, 0.1
    losses, _, _ = sa.dpo_loss(*as_tensors(PC, PR, RC, RR), beta=beta, label_smoothing=eps)
    ipo, _, _ = sa.dpo_loss(*as_tensors(PC, PR, RC, RR), beta=beta, loss_type="ipo")
    for i in range(3):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        smooth = -(1 - eps) * math.log(sigmoid(beta * h)) - eps * math.log(sigmoid(-beta * h))
        assert losses[i].item() == pytest.approx(smooth, rel=1e-6)
        assert ipo[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-6)
    with pytest.raises(ValueError, match="loss_type"):
        sa.dpo_loss(*as_tensors(PC, PR, RC, RR), loss_type="kto")


def test_dpo_loss_is_stable_and_fp32_for_large_margins():
    pc = torch.tensor([0.0, 0.0], dtype=torch.bfloat16)
    pr = torch.tensor([-4096.0, 4096.0], dtype=torch.bfloat16)  # exact in bf16
    losses, _, _ = sa.dpo_loss(pc, pr, torch.zeros(2), torch.zeros(2), beta=1.0)
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6)  # log(1 + e^-4096), not log(0)
    assert losses[1].item() == pytest.approx(4096.0, rel=1e-6)  # log(1 + e^4096) = 4096, not inf


# -----------------------------------------------------------------------------------------------------------
# Pairs and their log-probs on a tiny AR

CARD = (40, 16)


def tiny_ar(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = sa.LMConfig(**(dict(n_text=12, card=CARD, d_model=32, n_layer=2, n_head=2, dropout=0.1, max_text=32,
                              max_audio=96) | kw))
    return sa.AR(cfg).eval()


def random_pairs(n, k=1, seed=0):
    """A pairs dict as make_pairs writes it, with random texts, prompts, golden and rejected codes."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    texts = [torch.randint(1, 12, (rand(3, 8),), generator=g).tolist() for _ in range(n)]
    prompts = [torch.randint(0, CARD[0], (1, rand(2, 6)), generator=g) for _ in range(n)]
    chosen = [torch.randint(0, CARD[0], (rand(4, 12),), generator=g) for _ in range(n)]
    rejected = [torch.randint(0, CARD[0], (rand(2, 14),), generator=g) for _ in range(n * k)]
    return dict(texts=texts, prompts=prompts, chosen=chosen, rejected=rejected,
                pair_utt=[i for i in range(n) for _ in range(k)], hit_limit=torch.zeros(n * k, dtype=torch.bool))


def logps_alone(model, text, prompt, y, eos=True):
    """log p(y, EOS | text, prompt) (without EOS if not eos) from a forward of this one unpadded sequence, summed
    by hand."""
    ex = [(text, prompt, y.view(1, -1))]
    b = model.batch(ex)
    logp = model(**b)[0].double().log_softmax(-1)
    start = len(text) + prompt.shape[1] - 1  # the last prompt position predicts y[0]
    targets = y.tolist() + [model.eos] * eos
    return sum(logp[start + t, c].item() for t, c in enumerate(targets))


def test_pair_logps_score_target_and_eos_only_and_ignore_padding():
    model, pairs = tiny_ar(), random_pairs(5)
    for side in ("chosen", "rejected"):
        ex = sa.pair_examples(pairs, range(5), side)
        with torch.no_grad():
            logps, n = sa.ar_logps(model, ex)
        for j, (text, prompt, y) in enumerate(ex):
            assert n[j].item() == y.shape[1] + 1  # every target code and EOS, nothing of text or prompt
            assert logps[j].item() == pytest.approx(logps_alone(model, text, prompt, y[0]), abs=1e-4)
    # the same pair padded to different lengths (alone, or beside a longer one) gives the same loss
    idx_alone, idx_padded = [0], [0, int(max(range(5), key=lambda j: len(pairs["rejected"][j])))]
    ref = {"chosen": torch.tensor([-50.0, -60.0]), "rejected": torch.tensor([-40.0, -45.0])}
    out = []
    for idx in (idx_alone, idx_padded):
        with torch.no_grad():
            pc, _ = sa.ar_logps(model, sa.pair_examples(pairs, idx, "chosen"))
            pr, _ = sa.ar_logps(model, sa.pair_examples(pairs, idx, "rejected"))
        out.append(sa.dpo_loss(pc, pr, ref["chosen"][:len(idx)], ref["rejected"][:len(idx)])[0][0])
    assert out[0].item() == pytest.approx(out[1].item(), abs=1e-5)


def test_cut_and_empty_samples_are_scored_on_what_was_sampled():
    """A rejected sample cut at the length limit is scored on its codes alone (it never emitted EOS); an empty one
    (an immediate EOS) on that EOS alone; any other with its EOS. Checked against log-softmax summed by hand."""
    model, pairs = tiny_ar(), random_pairs(3)
    pairs["hit_limit"][0] = True
    pairs["rejected"][1] = torch.zeros(0, dtype=torch.long)
    with torch.no_grad():
        (chosen, rejected), (n_c, n_r) = sa.pair_logps(model, pairs, [0, 1, 2])
    r = pairs["rejected"]
    assert n_r.tolist() == [len(r[0]), 1, len(r[2]) + 1] and n_c.tolist() == [len(c) + 1 for c in pairs["chosen"]]
    for j in range(3):
        text, prompt = pairs["texts"][j], pairs["prompts"][j]
        assert rejected[j].item() == pytest.approx(logps_alone(model, text, prompt, r[j], eos=j != 0), abs=1e-4)
        assert chosen[j].item() == pytest.approx(logps_alone(model, text, prompt, pairs["chosen"][j]), abs=1e-4)
    # the empty sample: exactly the log-prob of EOS at the last prompt frame
    b = model.batch([(pairs["texts"][1], pairs["prompts"][1], torch.zeros(1, 0, dtype=torch.long))])
    with torch.no_grad():
        eos = model(**b)[0, -1].double().log_softmax(-1)[model.eos].item()
    assert rejected[1].item() == pytest.approx(eos, abs=1e-5)
    # the cut sample's EOS term would have been there before: it is what DPO would have pushed down
    with_eos = logps_alone(model, pairs["texts"][0], pairs["prompts"][0], r[0])
    assert abs(rejected[0].item() - with_eos) > 0.1


def test_policy_equal_to_reference_gives_log2_zero_rewards_and_a_gradient():
    model, pairs = tiny_ar(), random_pairs(4)
    ref = sa.reference_logps(tiny_ar(), pairs, list(range(4)))  # a second model built with the same seed
    logps, _ = sa.ar_logps(model, sa.pair_examples(pairs, range(4), "chosen") + sa.pair_examples(pairs, range(4), "rejected"))
    losses, r_c, r_r = sa.dpo_loss(logps[:4], logps[4:], ref["chosen"], ref["rejected"])
    torch.testing.assert_close(losses, torch.full((4,), math.log(2)), atol=1e-5, rtol=0)
    assert r_c.abs().max() < 1e-5 and r_r.abs().max() < 1e-5
    losses.mean().backward()
    assert sum(p.grad.norm() for p in model.parameters() if p.grad is not None) > 0


def test_one_step_widens_every_pairs_margin():
    """A small gradient step on the DPO loss moves each pair's log-ratio margin
    (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)) up: to first order by lr * w * |grad
    log pi(y_w) - grad log pi(y_l)|^2 >= 0. The chosen log-prob alone need not rise (the two sequences share
    parameters), so the rejected and chosen side are checked only as a whole."""
    model, pairs = tiny_ar(), random_pairs(4)
    idx = list(range(4))
    ref = sa.reference_logps(model, pairs, idx)
    logps, _ = sa.ar_logps(model, sa.pair_examples(pairs, idx, "chosen") + sa.pair_examples(pairs, idx, "rejected"))
    sa.dpo_loss(logps[:4], logps[4:], ref["chosen"], ref["rejected"])[0].mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-2 * p.grad
    after = sa.reference_logps(model, pairs, idx)
    margin = (after["chosen"] - ref["chosen"]) - (after["rejected"] - ref["rejected"])
    assert (margin > 0).all()
    assert (after["chosen"] - ref["chosen"]).sum() > 0 > (after["rejected"] - ref["rejected"]).sum()


def test_before_rewards_show_a_policy_that_training_sees_otherwise():
    """`before` is the policy measured as train_round trains it (its mode, its autocast, its forward) against
    the reference's log-probs: ~0 when the two agree, and not when dropout is on in training or the policy runs
    in bf16 against an fp32 reference (what the rewards of the first steps would start from). On this tiny
    model the largest difference was 0 when they agree, 1.2 nats with dropout and 0.017 from bf16."""
    pairs = random_pairs(8, k=2)
    idx = list(range(16))
    a = sa.AlignArgs(steps=1, batch_size=4, lr=1e-4, warmup=1)
    ref = sa.reference_logps(tiny_ar(), pairs, idx, a.batch_size)  # eval mode, fp32
    gap = lambda before: max((before[s] - ref[s]).abs().max().item() for s in ref)
    assert gap(sa.train_round(tiny_ar(), pairs, idx, ref, a, before=len(idx))) < 1e-4
    dropout_on = tiny_ar()
    dropout_on.eval = dropout_on.train  # as if train_round trained with dropout
    assert gap(sa.train_round(dropout_on, pairs, idx, ref, a, before=len(idx))) > 0.1
    bf16 = replace(a, precision="bf16")
    assert gap(sa.train_round(tiny_ar(), pairs, idx, ref, bf16, before=len(idx))) > 3e-3
    with sa.autocast("bf16", "cpu"):  # a reference taken under the same autocast agrees
        ref = sa.reference_logps(tiny_ar(), pairs, idx, a.batch_size)
    assert gap(sa.train_round(tiny_ar(), pairs, idx, ref, bf16, before=len(idx))) < 1e-3
    assert sa.train_round(tiny_ar(), pairs, idx, ref, a) is None  # not asked: no extra pass


def test_a_few_dpo_steps_raise_margin_and_accuracy():
    model, pairs = tiny_ar(), random_pairs(8, k=2)
    idx = sa.usable_pairs(pairs)
    assert idx == list(range(16))
    ref = sa.reference_logps(model, pairs, idx)
    a = sa.AlignArgs(steps=15, batch_size=8, lr=3e-3, warmup=1)
    before = sa.reward_metrics(sa.train_round(model, pairs, idx, ref, a, before=len(idx)), ref, a.beta)
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    after = sa.reward_metrics(sa.reference_logps(model, pairs, idx), ref, a.beta)
    assert after["rewards/margins"] > 1.0 and after["rewards/accuracies"] > 0.9
    assert not model.training  # dropout stays off


def test_usable_pairs_keep_empty_samples_and_drop_golden_copies():
    pairs = random_pairs(4)
    pairs["rejected"][0] = torch.zeros(0, dtype=torch.long)  # an immediate EOS: its EOS is scored
    pairs["rejected"][2] = pairs["chosen"][2].clone()  # the golden codes and EOS: nothing to learn
    pairs["rejected"][3] = pairs["chosen"][3].clone()  # the golden codes, cut at the limit: scored without EOS
    pairs["hit_limit"][3] = True
    assert sa.usable_pairs(pairs) == [0, 1, 3]


def test_make_pairs_skips_examples_that_do_not_fit():
    model = tiny_ar(max_audio=20)
    g = torch.Generator().manual_seed(0)
    ex = [([1] * lt, torch.randint(0, CARD[0], (1, lp), generator=g), torch.randint(0, CARD[0], (1, lg), generator=g))
          for lt, lp, lg in ((3, 5, 10), (3, 5, 15), (40, 2, 2), (4, 3, 16))]  # 5 + 15 + EOS > 20; 40 > 32
    pairs = sa.make_pairs(model, ex, k=2, frame_rate=50)
    assert pairs["stats"]["skipped_too_long"] == 2 and pairs["stats"]["n_utts"] == 2
    assert [c.tolist() for c in pairs["chosen"]] == [ex[0][2][0].tolist(), ex[3][2][0].tolist()]
    assert pairs["pair_utt"] == [0, 0, 1, 1] and len(pairs["hit_limit"]) == 4
    for j, i in enumerate(pairs["pair_utt"]):  # every sample, scored as DPO scores it, fits the positions
        assert pairs["prompts"][i].shape[1] + len(pairs["rejected"][j]) + (not pairs["hit_limit"][j]) <= 20
    sa.reference_logps(model, pairs, list(range(4)))


# -----------------------------------------------------------------------------------------------------------
# The loop on a tiny checkpoint

@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    corpus = load_corpus(CORPUS)
    tok = sa.TextTokenizer.build(corpus["phonemes"])
    torch.manual_seed(0)
    cfg = sa.LMConfig(n_text=len(tok.symbols), card=tuple(corpus["codec"]["card"]), d_model=32, n_layer=1,
                      n_head=2, dropout=0.1)
    path = tmp_path_factory.mktemp("init") / "ar.pt"
    sa.save_checkpoint(path, kind="ar", config=asdict(cfg), step=0, model=sa.AR(cfg).state_dict(), codec=corpus["codec"],
                       tokenizer={"symbols": tok.symbols, "kind": tok.kind})
    return str(path)


def args(init, out, *extra):
    return sa.parse_args(["--init", init, "--train", str(CORPUS), "--out", str(out), "--n_utts", "6", "--k", "2",
                          "--steps", "4", "--batch_size", "4", "--seconds_per_token", "0.02", "--lr", "1e-3",
                          "--warmup", "1", "--threads", "1", *extra])


def independent_logps(ckpt_path, pairs, side):
    """Log-probs of one side of every usable pair under a checkpoint, one unpadded sequence at a time (a rejected
    sample cut at the length limit without its EOS)."""
    model = sa.load_model(ckpt_path, "ar")[0]
    idx = pairs["reference"]["idx"].tolist()
    ex = sa.pair_examples(pairs, idx, side)
    eos = [side == "chosen" or not pairs["hit_limit"][j] for j in idx]
    with torch.no_grad():
        return torch.tensor([logps_alone(model, t, p, y[0], e) for (t, p, y), e in zip(ex, eos)])


@pytest.fixture(scope="module")
def two_rounds(init_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    return out, sa.align(args(init_ckpt, out, "--rounds", "2"))


def test_reference_is_the_round_start_model_and_is_replaced_between_rounds(init_ckpt, two_rounds):
    out, history = two_rounds
    p1 = torch.load(out / "round1/pairs.pt", weights_only=True)
    p2 = torch.load(out / "round2/pairs.pt", weights_only=True)
    for side in ("chosen", "rejected"):
        # round 1's reference is AR_1 (the init), although the policy trained on after it was computed ...
        torch.testing.assert_close(p1["reference"][side], independent_logps(init_ckpt, p1, side), atol=1e-3, rtol=0)
        # ... and round 2's is AR_2, the model round 1 produced
        torch.testing.assert_close(p2["reference"][side], independent_logps(out / "round1/ar.pt", p2, side),
                                   atol=1e-3, rtol=0)
    w0 = torch.load(init_ckpt, weights_only=True)["model"]["head.weight"]
    w1 = torch.load(out / "round1/ar.pt", weights_only=True)["model"]["head.weight"]
    w2 = torch.load(out / "round2/ar.pt", weights_only=True)["model"]["head.weight"]
    assert not torch.equal(w0, w1) and not torch.equal(w1, w2)
    for m in history:  # each round starts at margin 0 (policy == its reference) and DPO moves it up
        assert m["before"]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
        assert m["after"]["rewards/margins"] > 0
    for t in (1, 2):  # the first step's batch, scored in training layout before any update: pi = pi_ref
        first = json.loads(open(out / f"round{t}/log.jsonl").readline())
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4) and first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    log = [json.loads(line) for line in open(out / "round2/log.jsonl")]
    assert len(log) == 4 and {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                              "logps/chosen", "logps/rejected", "lengths/chosen", "lengths/rejected"} <= set(log[0])
    assert p1["stats"]["n_pairs"] == 12 and 0 <= p1["stats"]["hit_limit_share"] <= 1
    assert len(p1["rejected"]) == 12 and not torch.equal(p1["rejected"][0], p2["rejected"][0])  # fresh samples


def test_round_rewards_are_of_the_first_reward_pairs_and_leave_training_alone(init_ckpt, two_rounds, tmp_path):
    """metrics.json's rewards before and after a round are those of its first --reward_pairs usable pairs,
    against their reference log-probs: recomputed here one unpadded sequence at a time from the round's
    checkpoint. The count is not a training setting: the round's weights are those of the run that reports
    every pair, and a run with another count resumes its finished rounds."""
    sa.align(args(init_ckpt, tmp_path, "--rounds", "1", "--reward_pairs", "5"))
    m = json.loads((tmp_path / "round1/metrics.json").read_text())
    pairs = torch.load(tmp_path / "round1/pairs.pt", weights_only=True)
    assert m["reward_pairs"] == 5 and m["usable_pairs"] == 12
    now = {s: independent_logps(tmp_path / "round1/ar.pt", pairs, s)[:5] for s in ("chosen", "rejected")}
    expected = sa.reward_metrics(now, {s: pairs["reference"][s][:5] for s in now}, 0.1)
    assert m["after"] == pytest.approx(expected, abs=2e-3)
    assert m["after"]["rewards/margins"] != pytest.approx(two_rounds[1][0]["after"]["rewards/margins"], abs=1e-3)
    assert m["before"]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    trained = torch.load(tmp_path / "round1/ar.pt", weights_only=True)["model"]
    assert all(torch.equal(w, trained[k]) for k, w in
               torch.load(two_rounds[0] / "round1/ar.pt", weights_only=True)["model"].items())
    assert sa.align(args(init_ckpt, tmp_path, "--rounds", "1", "--reward_pairs", "0"))[0] == m


def test_finished_rounds_are_not_redone_and_other_settings_are_refused(init_ckpt, two_rounds, tmp_path):
    out, history = two_rounds
    stamp = (out / "round1/ar.pt").stat().st_mtime_ns
    again = sa.align(args(init_ckpt, out, "--rounds", "2"))
    assert again == history and (out / "round1/ar.pt").stat().st_mtime_ns == stamp
    assert sa.align(args(init_ckpt, out, "--rounds", "2", "--control_lr", "0.1")) == history  # not DPO's
    with pytest.raises(ValueError, match=r"round1/ar.pt.*beta: file has 0.1, this run has 0.3"):
        sa.align(args(init_ckpt, out, "--rounds", "2", "--beta", "0.3"))
    # an interrupted round keeps its pairs file; one made with other settings is refused, naming them
    import shutil
    shutil.copytree(out / "round1", tmp_path / "round1")
    (tmp_path / "round1/ar.pt").unlink()
    with pytest.raises(ValueError, match=r"pairs.pt: pairs made with other settings \(k: file has 2, this run has 3"):
        sa.align(args(init_ckpt, tmp_path, "--rounds", "1", "--k", "3"))


def test_control_trains_on_golden_codes_with_the_same_budget(init_ckpt, tmp_path):
    history = sa.align(args(init_ckpt, tmp_path, "--rounds", "1", "--control", "--control_lr", "3e-3"))
    log = [json.loads(line) for line in open(tmp_path / "round1/log.jsonl")]
    assert len(log) == 4 and "rewards/margins" not in log[0]
    assert [r["lr"] for r in log] == pytest.approx([3e-3] * 4)  # its own rate, not DPO's --lr 1e-3
    assert history[0]["pairs"]["n_pairs"] == 0  # nothing was sampled
    model = sa.load_model(tmp_path / "round1/ar.pt", "ar")[0]
    init = sa.load_model(init_ckpt, "ar")[0]
    assert not torch.equal(model.head.weight, init.head.weight)
    again = sa.align(args(init_ckpt, tmp_path, "--rounds", "1", "--control", "--control_lr", "3e-3", "--lr", "5"))
    assert again == history  # DPO's --lr is not the control's: its finished round resumes
    with pytest.raises(ValueError, match=r"control_lr: file has 0.003, this run has 0.001"):
        sa.align(args(init_ckpt, tmp_path, "--rounds", "1", "--control", "--control_lr", "1e-3"))


def test_bad_inputs_are_refused(init_ckpt, tmp_path, monkeypatch):
    ck = torch.load(init_ckpt, weights_only=True)
    ck["codec"] = ck["codec"] | {"name": "encodec24k-8x1024"}
    other = tmp_path / "other_codec.pt"
    sa.save_checkpoint(other, **ck)
    with pytest.raises(ValueError, match="encodec24k-8x1024.*melrvq"):
        sa.align(args(str(other), tmp_path / "a"))
    # a sampler that only ever gives back the golden codes leaves no usable pair: an error, not a silent no-op
    corpus = load_corpus(CORPUS)
    tok = sa.TextTokenizer.build(corpus["phonemes"])
    golden = {(tuple(t), tuple(p[0].tolist())): g[0] for t, p, g in sa.make_examples(corpus, tok, 3.0, seed=0)}
    monkeypatch.setattr(sa.AR, "generate", lambda self, texts, prompts, **kw: (
        [golden[tuple(t), tuple(p[0].tolist())] for t, p in zip(texts, prompts)],
        torch.zeros(len(texts), dtype=torch.bool)))
    with pytest.raises(ValueError, match="none of the 12 sampled pairs is usable"):
        sa.align(args(init_ckpt, tmp_path / "b"))


def test_command_line_runs_and_resumes(init_ckpt, tmp_path):
    cmd = [sys.executable, str(REPO / "speechalign.py"), "--init", init_ckpt, "--train", str(CORPUS), "--out",
           str(tmp_path), "--rounds", "1", "--n_utts", "4", "--k", "1", "--steps", "2", "--batch_size", "2",
           "--seconds_per_token", "0.01", "--threads", "1"]
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert re.search(r"round 1: margin [+-]0\.000 ->", first.stdout)  # before training: pi = pi_ref (the sign of ~1e-5 is noise)
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "round 1: done before" in second.stdout


def test_fresh_utterances_and_lr_decay_per_round(init_ckpt, tmp_path):
    sa.align(args(init_ckpt, tmp_path, "--rounds", "2", "--fresh_utts", "--lr_decay", "0.5"))
    corpus = load_corpus(CORPUS)
    tok = sa.TextTokenizer.build(corpus["phonemes"])
    pool = sa.make_examples(corpus, tok, 3.0, seed=0, frame_rate=corpus["codec"]["frame_rate"])
    for t, first in ((1, 0), (2, 6)):  # round t samples pairs for the t-th block of 6 utterances
        pairs = torch.load(tmp_path / f"round{t}/pairs.pt", weights_only=True)
        assert pairs["meta"]["first_utt"] == first
        assert pairs["texts"] == [list(x) for x, _, _ in pool[first:first + 6]]
        assert all(torch.equal(c, g[0]) for c, (_, _, g) in zip(pairs["chosen"], pool[first:first + 6]))
        lrs = [json.loads(line)["lr"] for line in open(tmp_path / f"round{t}/log.jsonl")]
        assert lrs == pytest.approx([1e-3 * 0.5 ** (t - 1)] * 4)  # warmup 1: the full rate from step 1
    sa.align(args(init_ckpt, tmp_path / "same", "--rounds", "2", "--no-fresh_utts", "--steps", "1"))
    assert torch.load(tmp_path / "same/round2/pairs.pt", weights_only=True)["meta"]["first_utt"] == 0
    with pytest.raises(ValueError, match=r"has \d+ utterances; 3 x --n_utts 1000 needs 3000"):
        sa.align(args(init_ckpt, tmp_path / "big", "--rounds", "3", "--fresh_utts", "--n_utts", "1000"))


def test_bf16_reference_equals_the_policy_at_the_first_step(init_ckpt, tmp_path):
    """With --precision bf16 the reference's log-probs are taken under the same autocast as the policy's in
    training: at the first step, before any update, the margin is 0 and the loss log 2 (an fp32 reference
    against a bf16 policy missed this by ~0.1 nats per sequence on the toy model)."""
    sa.align(args(init_ckpt, tmp_path, "--rounds", "1", "--precision", "bf16"))
    first = json.loads(open(tmp_path / "round1/log.jsonl").readline())
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-3) and first["loss"] == pytest.approx(math.log(2), abs=1e-3)
    # every pair (fewer than --reward_pairs), as training sees it
    before = json.loads((tmp_path / "round1/metrics.json").read_text())["before"]
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-3)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-3) and first["rewards/rejected"] == pytest.approx(0.0, abs=1e-3)
