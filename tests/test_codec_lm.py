"""Tests of the codec LM (speechalign.py) and its pretraining script (train_codec_lm.py).

Every quantity is checked against something computed another way: F.cross_entropy for sequence_logps, a
no-cache (and an unpadded, one-example) forward for the KV cache, hand-computed indices for the batch
layouts, the training targets for the overfitted models, and an uninterrupted run for --resume.
Tiny models (d_model 32-64, 1-2 layers) and one thread keep the whole file quick on a 2-core CPU.
"""
import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from codec import MelRVQCodec, load_corpus
from speechalign import (AR, NAR, LMConfig, TextTokenizer, attention_mask, frame_limit, load_model, lm_loss,
                         make_examples, sequence_logps, synthesise, too_long)

REPO = Path(__file__).resolve().parents[1]
TRAIN, VAL = REPO / "data/toy/test_seen.pt", REPO / "data/toy/test_unseen.pt"
CARD = (40, 16, 16, 16)  # layer-1 codebook of 40 (+ EOS = 40 for the AR), three 16-code layers for the NAR
N_TEXT = 12


def cfg(**kw):
    base = dict(n_text=N_TEXT, card=CARD, d_model=32, n_layer=2, n_head=2, dropout=0.1, max_text=32, max_audio=96)
    return LMConfig(**(base | kw))


def random_example(lt, lp, lg, g, card=CARD):
    """(text ids [lt] in 1..N_TEXT-1, prompt [Q, lp], target [Q, lg]) with each layer's codes in its card."""
    text = torch.randint(1, N_TEXT, (lt,), generator=g).tolist()
    codes = lambda n: torch.stack([torch.randint(0, c, (n,), generator=g) for c in card])
    return text, codes(lp), codes(lg)


def examples(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [random_example(*s, g) for s in sizes]


# -----------------------------------------------------------------------------------------------------------
# 1. sequence_logps

def reference_logps(logits, targets, mask):
    """float64 log p of the chosen tokens, summed per row, via F.cross_entropy with ignore_index."""
    t = torch.where(mask, targets, -100)
    return -F.cross_entropy(logits.double().transpose(1, 2), t, ignore_index=-100, reduction="none").sum(-1)


def test_sequence_logps_matches_cross_entropy_and_ignores_masked_values():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 17, 41
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[2] = False  # a row with nothing scored sums to 0
    ref = reference_logps(logits, targets, mask)
    got = sequence_logps(logits, targets, mask)
    assert got.shape == (B,)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    assert got[2] == 0
    # whatever sits at the unscored positions (out-of-range ids included) is never read
    for junk in (-100, -1, 10**12, V, V + 7):
        t = torch.where(mask, targets, junk)
        assert torch.equal(sequence_logps(logits, t, mask), got)


def test_sequence_logps_is_fp32_for_bf16_logits():
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 200, 1025
    logits = (torch.randn(B, T, V, generator=g) * 4).to(torch.bfloat16)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    got = sequence_logps(logits, targets, mask)
    assert got.dtype == torch.float32
    ref = reference_logps(logits.double(), targets, mask)  # the same bf16 values, computed in float64
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-3)
    # the test has teeth: a log-softmax done in bf16 is far off
    naive = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)
    assert (naive.double() - ref).abs().max() > 0.1


# -----------------------------------------------------------------------------------------------------------
# 2. AR generation: KV cache, left padding

def generation_setup(seed=0):
    torch.manual_seed(seed)
    ar = AR(cfg()).eval()
    with torch.no_grad():  # spread the logits out so that greedy choices are not near-ties
        ar.head.weight.mul_(20)
    ex = examples([(3, 5, 1), (7, 2, 1), (5, 0, 1)], seed)  # different text and prompt lengths (one empty prompt)
    return ar, [t for t, _, _ in ex], [p for _, p, _ in ex]


def test_kv_cache_greedy_matches_no_cache_and_unpadded_forward():
    ar, texts, prompts = generation_setup()
    kw = dict(temperature=0, seconds_per_token=0.03, frame_rate=50, return_logits=True)
    c1, hit1, log1 = ar.generate(texts, prompts, use_cache=True, **kw)
    c0, hit0, log0 = ar.generate(texts, prompts, use_cache=False, **kw)
    assert [c.tolist() for c in c1] == [c.tolist() for c in c0]
    assert torch.equal(hit1, hit0)
    assert len(log1) == len(log0) == max(len(c) + (not h) for c, h in zip(c1, hit1.tolist()))
    for a, b in zip(log1, log0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # limits: ceil(1.5 * text length) frames unless EOS came first
    for c, h, t in zip(c1, hit1, texts):
        assert len(c) <= -(-3 * len(t) // 2) and (not h or len(c) == -(-3 * len(t) // 2))
    # independent check of the left-padded batch: each example alone, right-padded as in training, gives the
    # same next-token logits at every step (the position that predicts generated frame k is lt + lp - 1 + k)
    for i, (t, p, c) in enumerate(zip(texts, prompts, c1)):
        b = ar.batch([(t, p, c.view(1, -1))])
        with torch.no_grad():
            logits = ar(**b)[0]
        start = len(t) + p.shape[1] - 1
        for k in range(len(c) + (not hit1[i])):  # an EOS step is included
            torch.testing.assert_close(log1[k][i], logits[start + k], rtol=1e-5, atol=1e-5)
            assert int(logits[start + k].argmax()) == (int(c[k]) if k < len(c) else ar.eos)


def test_kv_cache_sampling_same_seed_same_tokens():
    ar, texts, prompts = generation_setup(1)
    with torch.no_grad():
        ar.head.weight.div_(10)  # a softer distribution, so that sampling really samples
    out = {}
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(123)
        out[use_cache] = ar.generate(texts, prompts, temperature=1.0, top_k=20, top_p=0.95, seconds_per_token=0.04,
                                     use_cache=use_cache, generator=gen, frame_rate=50)
    assert [c.tolist() for c in out[True][0]] == [c.tolist() for c in out[False][0]]
    assert torch.equal(out[True][1], out[False][1])
    greedy, _ = ar.generate(texts, prompts, temperature=0, seconds_per_token=0.04, frame_rate=50)
    assert [c.tolist() for c in out[True][0]] != [c.tolist() for c in greedy]  # sampling did sample


class NoEOS(AR):
    """An AR that never emits EOS, so that every sample runs to its length limit."""

    def forward(self, *a, **kw):
        logits = super().forward(*a, **kw)
        logits[..., self.eos] = -float("inf")
        return logits


def test_frame_limit_is_seconds_per_text_token_at_the_codec_frame_rate():
    n = list(range(1, 2001))
    assert [frame_limit(0.16, 50, k) for k in n] == [8 * k for k in n]  # the toy's 8 frames per token, exactly
    assert [frame_limit(0.16, 75, k) for k in n] == [12 * k for k in n]  # EnCodec: the same duration
    assert [math.ceil(0.16 * k * 50) for k in n] != [8 * k for k in n]  # a bare ceil of the float product is not
    assert frame_limit(0.07, 75, 4) == 21  # 0.07 * 75 = 5.250000000000001 in floats: a bare ceil gives 22
    assert frame_limit(0.03, 50, 3) == 5  # 4.5 frames: a partial frame rounds up


def test_sampling_stops_at_the_frame_limit_or_the_audio_positions():
    torch.manual_seed(0)
    ar = NoEOS(cfg(max_audio=96)).eval()
    ex = examples([(3, 5, 1), (7, 80, 1)])
    texts, prompts = [t for t, _, _ in ex], [p for _, p, _ in ex]
    # 0.16 s x 3 tokens; 7 tokens capped at 96 - 80 frames, and that sequence, done first, stays inside the
    # positions while the other one samples on
    for rate, want in ((50, [24, 16]), (75, [36, 16])):
        for use_cache in (True, False):
            codes, hit = ar.generate(texts, prompts, temperature=0, seconds_per_token=0.16, frame_rate=rate,
                                     use_cache=use_cache)
            assert [len(c) for c in codes] == want and hit.all()
    with pytest.raises(ValueError, match="no room"):  # a prompt that fills the positions is the caller's to skip
        ar.generate(texts, [prompts[0], torch.zeros(1, 96, dtype=torch.long)], frame_rate=50)


def test_too_long_is_the_one_rule_for_examples_that_do_not_fit():
    (ex,) = examples([(8, 6, 9)])
    assert too_long(ex, max_text=8, max_audio=16) is None  # 6 + 9 + EOS = 16 frames
    assert too_long(ex, max_text=7, max_audio=16) == "8 text tokens > 7"
    assert too_long(ex, max_text=8, max_audio=15) == "prompt 6 + target 9 + EOS > 15 audio frames"
    assert too_long(ex, max_text=8, max_audio=16, prompt_frames=7) is not None  # judged with a longer prompt
    ar = AR(cfg(max_text=8, max_audio=16)).eval()
    ar(**ar.batch([ex]))  # what the rule keeps fits the model's positions


# -----------------------------------------------------------------------------------------------------------
# 3. AR causality and padding invariance

def test_ar_is_causal():
    torch.manual_seed(0)
    ar = AR(cfg()).eval()
    ex = examples([(4, 3, 9)])
    b = ar.batch(ex)
    with torch.no_grad():
        base = ar(**b)
    lt, lp = 4, 3
    for t in (lt + lp, lt + lp + 4, lt + lp + 8):  # perturb audio codes at sequence positions >= t
        b2 = {k: v.clone() for k, v in b.items()}
        b2["audio"][0, 0, t:] = (b2["audio"][0, 0, t:] + 7) % CARD[0]
        with torch.no_grad():
            out = ar(**b2)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert (out[0, t:] - base[0, t:]).abs().max() > 1e-3  # and the change does show up from t on


def test_ar_right_padding_invariance():
    torch.manual_seed(0)
    ar = AR(cfg()).eval()
    short, long = examples([(3, 2, 4), (6, 5, 9)])
    with torch.no_grad():
        alone = ar(**ar.batch([short]))[0]
        both = ar(**ar.batch([short, long]))
    n = 3 + 2 + 4
    assert alone.shape[0] == n and both.shape[1] == 6 + 5 + 9
    torch.testing.assert_close(both[0, :n], alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(both).all()  # padding rows are not NaN either


def test_ar_causal_path_matches_the_mask_and_is_not_taken_for_left_padding():
    """A right-padded batch (training, scoring) runs SDPA's is_causal path instead of building the mask; the real
    positions' logits are those of the explicit mask. The same rows left-padded must build the mask (else real
    tokens would see the padding before them) and give the same logits."""
    torch.manual_seed(0)
    ar = AR(cfg()).eval()
    b = ar.batch(examples([(3, 2, 4), (6, 5, 9)]))
    pad = (~b["valid"]).sum(1).tolist()
    left = {k: torch.stack([row.roll(p, -1) for row, p in zip(v, pad)]) for k, v in b.items()}
    with torch.no_grad():
        fast = ar(**b)
        masked = ar(**b, mask=attention_mask(b["valid"], causal=True))
        shifted = ar(**left)
    torch.testing.assert_close(fast[b["valid"]], masked[b["valid"]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shifted[left["valid"]], masked[b["valid"]], rtol=1e-5, atol=1e-5)


def test_attention_mask_by_hand():
    valid = torch.tensor([[True, True, True, False]])
    causal = attention_mask(valid, causal=True)[0].int().tolist()
    assert causal == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]  # padding row sees itself
    full = attention_mask(valid, causal=False)[0].int().tolist()
    assert full == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


# -----------------------------------------------------------------------------------------------------------
# 4. AR.batch layout and targets

def test_ar_batch_layout_and_targets():
    ar = AR(cfg())
    sizes = [(3, 4, 5), (2, 0, 3), (6, 2, 7)]
    ex = examples(sizes)
    b = ar.batch(ex)
    T = max(sum(s) for s in sizes)
    assert b["targets"].shape == (3, T) and b["audio"].shape == (3, 1, T)
    for i, ((t, p, g), (lt, lp, lg)) in enumerate(zip(ex, sizes)):
        n = lt + lp + lg
        assert b["valid"][i].tolist() == [True] * n + [False] * (T - n)
        assert b["is_audio"][i].tolist() == [False] * lt + [True] * (lp + lg) + [False] * (T - n)
        assert b["text"][i, :lt].tolist() == t
        assert b["audio"][i, 0, lt:n].tolist() == p[0].tolist() + g[0].tolist()
        assert (b["audio"][i, 0, :lt] == -1).all() and (b["audio"][i, 0, n:] == -1).all()
        assert b["pos"][i, :n].tolist() == list(range(lt)) + list(range(-lp, 0)) + list(range(lg))
        # scored: from the last prompt position (the last text position when there is no prompt) to the last
        # target frame, lg + 1 positions, predicting g[0] then EOS
        want = [-100] * T
        want[lt + lp - 1:lt + lp + lg] = g[0].tolist() + [CARD[0]]
        assert b["targets"][i].tolist() == want
        assert (b["targets"][i] != -100).sum() == lg + 1 and ar.eos == CARD[0]
    # changing text or prompt codes never moves the scored positions
    ex2 = [([(x % (N_TEXT - 1)) + 1 for x in t[::-1]], (p + 3) % CARD[0], g) for t, p, g in ex]
    b2 = ar.batch(ex2)
    assert torch.equal(b2["targets"], b["targets"])


def test_ar_batch_scores_eos_only_where_asked():
    """A sample cut at the length limit (eos False) is scored on its codes alone; an empty sample that ended
    with an immediate EOS is scored on that EOS alone."""
    ar = AR(cfg())
    sizes = [(3, 4, 5), (2, 3, 6), (4, 2, 0)]
    ex = examples(sizes)
    b = ar.batch(ex, eos=[True, False, True])
    T = max(sum(s) for s in sizes)
    want = [[-100] * T for _ in sizes]
    want[0][3 + 4 - 1:3 + 4 + 5] = ex[0][2][0].tolist() + [ar.eos]
    want[1][2 + 3 - 1:2 + 3 + 6 - 1] = ex[1][2][0].tolist()  # no EOS: the last frame predicts nothing
    want[2][4 + 2 - 1] = ar.eos  # the last prompt frame predicts EOS
    assert b["targets"].tolist() == want
    assert torch.equal(ar.batch(ex)["targets"][0], b["targets"][0])  # the default: every example ends with EOS
    for k in ("text", "audio", "is_audio", "pos", "valid"):  # the inputs are the same either way
        assert torch.equal(ar.batch(ex)[k], b[k])



def test_lm_loss_is_mean_over_scored_positions_by_hand():
    torch.manual_seed(0)
    ar = AR(cfg()).eval()
    sizes = [(3, 4, 5), (6, 2, 7)]
    ex = examples(sizes)
    b = ar.batch(ex)
    with torch.no_grad():
        logits = ar(**b)
        loss = lm_loss(ar, b)
    rows, tgts = [], []
    for i, ((t, p, g), (lt, lp, lg)) in enumerate(zip(ex, sizes)):
        seq = p[0].tolist() + g[0].tolist()
        for k in range(lg + 1):  # position lt + lp - 1 + k sees audio up to frame lp - 1 + k
            rows.append(logits[i, lt + lp - 1 + k])
            tgts.append(g[0, k].item() if k < lg else ar.eos)
        assert len(seq) == lp + lg
    ref = F.cross_entropy(torch.stack(rows).double(), torch.tensor(tgts))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_lm_loss_runs_the_head_at_scored_positions_alone_with_the_full_heads_loss_and_gradients():
    """The output head sees one row per scored token (not B x T); the loss and every gradient are
    those of float64 cross-entropy over the full head's logits with ignore_index (AR and NAR)."""
    torch.manual_seed(0)
    sizes = [(3, 4, 5), (6, 2, 7), (2, 3, 1)]
    for model in (AR(cfg(dropout=0.0)), NAR(cfg(dropout=0.0))):
        is_ar = isinstance(model, AR)
        b = model.batch(examples(sizes)) if is_ar else model.batch(examples(sizes), 2)
        rows = []
        head = model.head if is_ar else model.heads[1]
        hook = head.register_forward_hook(lambda m, inputs, out: rows.append(inputs[0].shape))
        loss = lm_loss(model, b)
        hook.remove()
        assert rows == [(int((b["targets"] != -100).sum()), 32)]
        params = [p for p in model.parameters()]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        full = F.cross_entropy(model(**b).double().transpose(1, 2), b["targets"], ignore_index=-100)
        torch.testing.assert_close(loss.double(), full, rtol=1e-5, atol=1e-6)
        for g, g_full in zip(grads, torch.autograd.grad(full, params, allow_unused=True)):
            assert (g is None) == (g_full is None)
            if g is not None:
                torch.testing.assert_close(g, g_full, rtol=1e-4, atol=1e-7)


def test_positions_beyond_the_tables_raise():
    ar = AR(cfg(max_text=8, max_audio=16)).eval()
    long_text = examples([(9, 2, 3)])  # 9 text tokens > max_text = 8
    with pytest.raises(ValueError, match="positions"):
        ar(**ar.batch(long_text))
    for long_audio in examples([(3, 2, 17)]), examples([(3, 17, 2)]):  # 17 target or prompt frames > 16
        with pytest.raises(ValueError, match="positions"):
            ar(**ar.batch(long_audio))
    ar(**ar.batch(examples([(8, 16, 16)])))  # exactly full tables are fine (too_long skips it before)


# -----------------------------------------------------------------------------------------------------------
# 5. NAR.batch layout, bidirectionality

def test_nar_batch_layout_and_targets():
    nar = NAR(cfg())
    sizes = [(3, 4, 5), (5, 2, 2)]
    ex = examples(sizes)
    Q = len(CARD)
    for j in range(1, Q):
        b = nar.batch(ex, j)
        T = max(sum(s) for s in sizes)
        assert b["j"] == j and b["audio"].shape == (2, Q, T)
        for i, ((t, p, g), (lt, lp, lg)) in enumerate(zip(ex, sizes)):
            n = lt + lp + lg
            assert b["text"][i, :lt].tolist() == t
            assert (b["audio"][i, :, :lt] == -1).all() and (b["audio"][i, :, n:] == -1).all()
            assert torch.equal(b["audio"][i, :, lt:lt + lp], p)  # the prompt: every layer
            assert torch.equal(b["audio"][i, :j, lt + lp:n], g[:j])  # the target: layers < j ...
            assert (b["audio"][i, j:, lt + lp:n] == -1).all()  # ... and nothing of layers >= j
            want = [-100] * T
            want[lt + lp:n] = g[j].tolist()
            assert b["targets"][i].tolist() == want
            assert b["pos"][i, :n].tolist() == list(range(lt)) + list(range(-lp, 0)) + list(range(lg))
        with torch.no_grad():
            assert nar(**b).shape == (2, T, CARD[j])
    # without layer j (generation) nothing is scored
    b = nar.batch([(t, p, g[:2]) for t, p, g in ex], 2)
    assert (b["targets"] == -100).all()


def test_nar_is_bidirectional_and_ignores_absent_layers():
    torch.manual_seed(0)
    nar = NAR(cfg()).eval()
    with torch.no_grad():  # louder code embeddings, so that a changed code moves the logits visibly
        for emb in nar.audio_emb:
            emb.weight.mul_(20)
    ex = examples([(4, 3, 8)])
    j, last = 2, 4 + 3 + 8 - 1
    b = nar.batch(ex, j)
    with torch.no_grad():
        base = nar(**b)
        b2 = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()}
        b2["audio"][0, 0, last] = (b2["audio"][0, 0, last] + 5) % CARD[0]  # change the last frame's layer 1
        out = nar(**b2)
        # earlier positions see it (under causal attention they would not move at all; the size of the change
        # depends on the random weights, so the bound only has to clear float noise)
        assert (out[0, :last] - base[0, :last]).abs().max() > 1e-5
        # layers >= j of the target are not in the input: other values there change nothing
        t, p, g = ex[0]
        other = nar.batch([(t, p, torch.cat([g[:j], (g[j:] + 3) % 16]))], j)
        torch.testing.assert_close(nar(**other), base, rtol=0, atol=0)


# -----------------------------------------------------------------------------------------------------------
# 6. Overfitting one fixed batch
# Measured (seed 0, 150 Adam steps at lr 3e-3, dropout 0): AR loss ~0.009, NAR loss ~0.005 nats/token;
# the thresholds below (0.05) leave a 5-10x margin, while an untrained model sits at ~log(41) = 3.7.

def overfit(model, batches, steps=150, lr=3e-3):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = sum(lm_loss(model, b) for b in batches) / len(batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return [lm_loss(model, b).item() for b in batches]


def test_ar_overfits_and_greedy_reproduces_targets():
    torch.manual_seed(0)
    ar = AR(cfg(dropout=0.0))
    ex = examples([(4, 5, 6), (6, 3, 8)], seed=1)
    (loss,) = overfit(ar, [ar.batch(ex)])
    assert loss < 0.05, loss
    codes, hit = ar.generate([t for t, _, _ in ex], [p for _, p, _ in ex], temperature=0, seconds_per_token=0.08,
                            frame_rate=50)
    assert [c.tolist() for c in codes] == [g[0].tolist() for _, _, g in ex]
    assert not hit.any()  # it stopped at EOS


def test_nar_overfits_and_greedy_reproduces_targets():
    torch.manual_seed(0)
    nar = NAR(cfg(dropout=0.0))
    ex = examples([(4, 5, 6), (6, 3, 8)], seed=1)
    losses = overfit(nar, [nar.batch(ex, j) for j in range(1, len(CARD))])
    assert max(losses) < 0.05, losses
    dtypes = []  # what the heads compute in: bf16 passes are asked for by eval.py --nar_precision bf16
    for head in nar.heads:
        head.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        dtypes.clear()
        out = nar.generate([t for t, _, _ in ex], [p for _, p, _ in ex], [g[0] for _, _, g in ex], precision)
        for o, (_, _, g) in zip(out, ex):
            assert torch.equal(o, g), precision
        assert dtypes == [dtype] * (len(CARD) - 1)


# -----------------------------------------------------------------------------------------------------------
# 7. TextTokenizer

def test_nar_expected_upper_layers_are_the_probability_weighted_tables():
    """NAR.generate(expected=tables): the codes are those of plain generate (each pass reads the argmax codes of
    the layers below), and the upper part is sum_{j>=2} softmax(logits_j) @ tables_j, recomputed here pass by
    pass in float64 on one example at a time (no batch padding) - not what decoding the argmax codes gives."""
    torch.manual_seed(0)
    nar = NAR(cfg(dropout=0.0)).eval()
    ex = examples([(4, 5, 6), (6, 3, 9)], seed=2)
    texts, prompts, layer1 = [t for t, _, _ in ex], [p for _, p, _ in ex], [g[0] for _, _, g in ex]
    tables = [torch.randn(n, 5) for n in CARD]
    plain = nar.generate(texts, prompts, layer1)
    codes, uppers = nar.generate(texts, prompts, layer1, expected=tables)
    assert all(torch.equal(a, b) for a, b in zip(codes, plain))
    for (t, p, _), c, u in zip(ex, codes, uppers):
        want, argmax = torch.zeros(c.shape[1], 5, dtype=torch.float64), torch.zeros(c.shape[1], 5, dtype=torch.float64)
        for j in range(1, len(CARD)):
            with torch.no_grad():
                logits = nar(**nar.batch([(t, p, c[:j])], j))[0, len(t) + p.shape[1]:].double()
            want += logits.softmax(-1) @ tables[j].double()
            argmax += tables[j].double()[c[j]]
        assert u.shape == (c.shape[1], 5) and u.dtype == torch.float32
        torch.testing.assert_close(u.double(), want, atol=1e-5, rtol=0)
        assert (u.double() - argmax).abs().max() > 0.1
    with pytest.raises(ValueError, match=r"tables have \[40, 16, 16\] entries"):
        nar.generate(texts, prompts, layer1, expected=tables[:3])


def test_synthesise_returns_the_nars_expected_upper_layers_for_the_ars_layer1():
    """synthesise(expected=tables) returns, beside the codes and hit_limit it returns without `expected` (the
    same ones), the NAR's expected upper part for the layer 1 the AR sampled: a second path, NAR.generate on
    those layer-1 codes, gives the same tensors."""
    torch.manual_seed(0)
    ar, nar = AR(cfg()).eval(), NAR(cfg()).eval()
    ex = examples([(4, 5, 6), (6, 3, 9)], seed=3)
    texts, prompts = [t for t, _, _ in ex], [p for _, p, _ in ex]
    tables = [torch.randn(n, 5) for n in CARD]
    sampling = dict(temperature=0, seconds_per_token=0.08, frame_rate=50)
    codes, hit = synthesise(ar, nar, texts, prompts, **sampling)
    codes2, hit2, uppers = synthesise(ar, nar, texts, prompts, expected=tables, **sampling)
    assert all(torch.equal(a, b) for a, b in zip(codes, codes2)) and torch.equal(hit, hit2)
    _, want = nar.generate(texts, prompts, [c[0] for c in codes], expected=tables)
    assert len(uppers) == len(want) == 2 and all(torch.equal(u, w) for u, w in zip(uppers, want))


def test_tokenizer_phonemes():
    tok = TextTokenizer.build(["D @2 | k w 'I k", "b r 'aU n | f 'A k s"])
    assert tok.symbols[0] == "<pad>"
    assert tok.symbols[1:] == sorted({"D", "@2", "|", "k", "w", "'I", "b", "r", "'aU", "n", "f", "'A", "s"})
    ids = tok.encode("k w 'I k | f 'A k s")
    assert 0 not in ids
    assert [tok.symbols[i] for i in ids] == "k w 'I k | f 'A k s".split()
    with pytest.raises(ValueError, match=r"utt_7.*'Z'"):
        tok.encode("k Z", utt="utt_7")
    with pytest.raises(ValueError, match="utt_8"):
        tok.encode("   ", utt="utt_8")
    # a tokenizer rebuilt from the saved symbol list (as load_model does) encodes the same
    again = TextTokenizer(tok.symbols, tok.kind)
    assert again.symbols == tok.symbols and again.encode("D @2 | s") == tok.encode("D @2 | s")


def test_tokenizer_letters():
    tok = TextTokenizer.build(["ignored"], kind="letters")
    ids = tok.encode("It's  a   DOG")
    assert "".join(tok.symbols[i] for i in ids) == "it's a dog"
    with pytest.raises(ValueError, match=r"u1.*'3'"):
        tok.encode("route 3", utt="u1")
    with pytest.raises(ValueError, match="empty"):
        tok.encode("", utt="u2")
    with pytest.raises(ValueError):
        TextTokenizer([], kind="words")


# -----------------------------------------------------------------------------------------------------------
# train_codec_lm.py: batches, checkpoints, --resume, DDP

class Identity:  # model.batch stand-in for batch_for_step: return the chosen examples
    def batch(self, chosen, device=None):
        return chosen


def test_batch_for_step_full_batches_each_example_once_per_epoch():
    from train_codec_lm import batch_for_step

    n, bs = 362, 4  # not a multiple of the batch size: the 2 leftover examples must not make a short batch
    g = torch.Generator().manual_seed(0)
    ex = [([1], torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, int(torch.randint(1, 9, (1,), generator=g))))
          for _ in range(n)]
    args = argparse.Namespace(seed=0, batch_size=bs, model="ar", short_first=False)
    per_epoch = n // bs
    for epoch in range(2):
        seen = []
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            chosen = batch_for_step(Identity(), lambda s: ex, step, args, 1, 0, "cpu")
            assert len(chosen) == bs, (step, len(chosen))
            shards = [batch_for_step(Identity(), lambda s: ex, step, args, 2, r, "cpu") for r in range(2)]
            assert sorted(map(id, shards[0] + shards[1])) == sorted(map(id, chosen))  # DDP: ranks split it
            seen += [id(e) for e in chosen]
        assert len(set(seen)) == len(seen) == per_epoch * bs


def test_short_first_sorts_the_first_epoch_only():
    """--short_first: epoch 0 takes the same examples as without it, each once, in batches whose targets never
    get shorter (batch k's longest <= batch k+1's shortest, so the batch means are non-decreasing); epoch 1 is
    the usual one. Without the option epoch 0 is not sorted (the check can fail)."""
    from train_codec_lm import batch_for_step

    n, bs = 362, 4
    g = torch.Generator().manual_seed(1)
    ex = [([1], torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, int(torch.randint(1, 60, (1,), generator=g))))
          for _ in range(n)]
    per_epoch = n // bs
    runs = {}
    for short_first in (False, True):
        args = argparse.Namespace(seed=0, batch_size=bs, model="ar", short_first=short_first)
        runs[short_first] = [batch_for_step(Identity(), lambda s: ex, step, args, 1, 0, "cpu")
                             for step in range(2 * per_epoch)]
        shards = [batch_for_step(Identity(), lambda s: ex, 5, args, 2, r, "cpu") for r in range(2)]
        assert sorted(map(id, shards[0] + shards[1])) == sorted(map(id, runs[short_first][5]))
    lengths = {k: [[e[2].shape[1] for e in b] for b in v] for k, v in runs.items()}
    first = lengths[True][:per_epoch]
    assert all(max(a) <= min(b) for a, b in zip(first, first[1:]))
    means = [sum(b) / bs for b in first]
    assert means == sorted(means) and means[0] < means[-1]
    ids = lambda batches: sorted(id(e) for b in batches for e in b)
    assert ids(runs[True][:per_epoch]) == ids(runs[False][:per_epoch])  # the same examples, each once
    assert len(set(ids(runs[True][:per_epoch]))) == per_epoch * bs
    unsorted = lambda batches: any(sum(a) > sum(b) for a, b in zip(batches, batches[1:]))
    assert unsorted(lengths[False][:per_epoch]) and unsorted(lengths[True][per_epoch:])
    assert runs[True][per_epoch:] == runs[False][per_epoch:]  # later epochs as without the option


def test_prompt_lengths_are_drawn_from_the_range_reproducibly_and_a_fixed_length_draws_none():
    """make_examples with prompt_seconds_min: each prompt is the fixed-length prompt cut to a length drawn from
    [min, max] frames; the lengths span the range, are about uniform, and are the same for the same seed.
    Without it (or with min = max), the examples are today's: the first prompt_seconds of the utterance that
    random.Random(seed).choice picks among the speaker's others, computed here by hand."""
    corpus = load_corpus(TRAIN)
    tok = TextTokenizer.build(corpus["phonemes"])
    assert min(u.shape[1] for u in corpus["utts"]) >= 75  # every drawn length fits in every utterance
    fixed = make_examples(corpus, tok, 1.5, seed=7)
    rng, spk = random.Random(7), corpus["speakers"]
    for i, (text, prompt, target) in enumerate(fixed):
        j = rng.choice([j for j in range(len(spk)) if spk[j] == spk[i] and j != i])
        assert torch.equal(prompt, corpus["utts"][j][:, :75]) and torch.equal(target, corpus["utts"][i])
    same = make_examples(corpus, tok, 1.5, seed=7, prompt_seconds_min=1.5)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(fixed, same, strict=True))
    drawn = make_examples(corpus, tok, 1.5, seed=7, prompt_seconds_min=0.5)
    lengths = [p.shape[1] for _, p, _ in drawn]
    for (_, p, g), (_, q, h) in zip(drawn, fixed, strict=True):
        assert torch.equal(p, q[:, :p.shape[1]]) and torch.equal(g, h)
    assert 25 <= min(lengths) <= 27 and 73 <= max(lengths) <= 75 and len(set(lengths)) > 40
    assert abs(sum(lengths) / len(lengths) - 50) < 4  # uniform over 25..75: mean 50, its s.e. 0.8 here
    assert lengths == [p.shape[1] for _, p, _ in make_examples(corpus, tok, 1.5, seed=7, prompt_seconds_min=0.5)]
    assert lengths != [p.shape[1] for _, p, _ in make_examples(corpus, tok, 1.5, seed=8, prompt_seconds_min=0.5)]
    with pytest.raises(ValueError, match="0 < prompt_seconds_min <= prompt_seconds"):
        make_examples(corpus, tok, 1.5, prompt_seconds_min=2.0)


def train_argv(out, *extra, steps=8, model="ar"):
    return ["--model", model, "--out", str(out), "--train", str(TRAIN), "--val", str(VAL), "--d_model", "32",
            "--n_layer", "1", "--n_head", "2", "--batch_size", "4", "--eval_utts", "8", "--steps", str(steps),
            "--warmup", "2", "--ckpt_every", "2", "--dropout", "0.1", "--eval_every", "1000", *extra]


def train(out, *extra, steps=8, model="ar", launcher=None, timeout=300):
    argv = train_argv(out, *extra, steps=steps, model=model)
    cmd = [*(launcher or [sys.executable]), str(REPO / "train_codec_lm.py"), *argv]
    env = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def read_log(out):
    return [json.loads(line) for line in open(f"{out}.log.jsonl")]


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory):
    """One uninterrupted 8-step AR run (run A of the resume test; its checkpoint serves the load tests)."""
    out = tmp_path_factory.mktemp("run_a") / "ar.pt"
    train(out)
    return out


def test_checkpoint_loads_into_the_same_model(ar_run):
    ckpt = torch.load(ar_run, map_location="cpu", weights_only=True)
    assert ckpt["kind"] == "ar" and ckpt["step"] == 8
    model, tok, ck = load_model(ar_run, "ar")
    assert not model.training and isinstance(model, AR)
    assert model.cfg.d_model == 32 and len(model.blocks) == 1 and model.cfg.card == tuple(ckpt["codec"]["card"])
    sd = model.state_dict()
    assert sd.keys() == ckpt["model"].keys()
    for k, v in ckpt["model"].items():
        assert torch.equal(sd[k], v), k
    # the weights were trained (differ from a fresh model built with the same seed and config)
    torch.manual_seed(0)
    fresh = AR(model.cfg)
    assert not torch.equal(fresh.head.weight, model.head.weight)
    # a second load gives the same outputs; a model built by hand from the checkpoint's dict does too
    other = AR(LMConfig(**ckpt["config"]))
    other.load_state_dict(ckpt["model"])
    other.eval()
    model2, _, _ = load_model(ar_run, "ar")
    ex = [(tok.encode("D @2 | k w ' I k"), torch.randint(0, 1024, (8, 6)), torch.randint(0, 256, (8, 5)))]
    ex[0][2][0] = torch.randint(0, 1024, (5,))
    b = model.batch(ex)
    with torch.no_grad():
        y = model(**b)
        torch.testing.assert_close(model2(**b), y, rtol=0, atol=0)
        torch.testing.assert_close(other(**b), y, rtol=0, atol=0)
    assert tok.symbols == ckpt["tokenizer"]["symbols"] and tok.kind == "phonemes"
    with pytest.raises(ValueError, match="holds an AR model, not an NAR"):
        load_model(ar_run, "nar")


def test_resume_follows_the_uninterrupted_run(ar_run, tmp_path):
    out = tmp_path / "ar.pt"
    train(out, "--stop_after", "4")
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert torch.load(out, weights_only=True)["step"] == 4
    with open(f"{out}.log.jsonl", "a") as f:  # records from beyond the checkpoint, as a crash would leave
        f.write(json.dumps({"step": 5, "loss": -1.0}) + "\n" + '{"step": 6, "lo')  # the last one cut short
    train(out, "--resume")
    a, b = read_log(ar_run), read_log(out)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in b] == [r["loss"] for r in a]
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a]
    assert b[-1]["val_loss"] == a[-1]["val_loss"]
    sa, sb = torch.load(ar_run, weights_only=True), torch.load(out, weights_only=True)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k


def test_training_draws_prompt_lengths_and_validates_with_fixed_prompts(tmp_path, monkeypatch):
    """--prompt_seconds_min reaches the training examples (lengths spanning the range) and the checkpoint's
    args; validation keeps fixed --prompt_seconds prompts. A run without it stores the fixed length."""
    import train_codec_lm
    seen = {}

    def spy(corpus, *a, **kw):
        ex = make_examples(corpus, *a, **kw)
        seen.setdefault(corpus["ids"][0], []).append([p.shape[1] for _, p, _ in ex])
        return ex
    monkeypatch.setattr(train_codec_lm, "make_examples", spy)
    out = tmp_path / "ar.pt"
    train_codec_lm.main(train_argv(out, "--prompt_seconds", "1.5", "--prompt_seconds_min", "0.5", steps=1))
    (train_lengths,), (val_lengths,) = seen[load_corpus(TRAIN)["ids"][0]], seen[load_corpus(VAL)["ids"][0]]
    assert min(train_lengths) <= 27 and max(train_lengths) >= 73 and set(val_lengths) == {75}
    args = torch.load(out, weights_only=True)["args"]
    assert (args["prompt_seconds"], args["prompt_seconds_min"], args["short_first"]) == (1.5, 0.5, False)
    with pytest.raises(SystemExit):
        train_codec_lm.get_args(train_argv(out, "--prompt_seconds_min", "4"))


def test_extra_train_adds_its_utterances_keeps_the_tokenizer_and_refuses_repeated_ids(tmp_path, monkeypatch):
    """--extra_train: the training examples are --train's and then the extra corpus's (its voices prompted by
    their own utterances); the tokenizer is --train's alone, so a NAR trained with more voices shares the AR's ids;
    an extra corpus repeating an id, or of another codec, is refused naming it."""
    import train_codec_lm
    base = load_corpus(TRAIN)
    n = 12
    extra = {k: base[k] for k in ("codec", "codes", "lengths")} | {
        "ids": [f"{i}@x" for i in base["ids"]], "speakers": [f"{s}@x" for s in base["speakers"]],
        "texts": base["texts"], "phonemes": ["D @2"] * len(base["ids"])}  # two symbols --train has
    extra["lengths"] = base["lengths"][:n]
    extra["codes"] = base["codes"][:, :int(base["lengths"][:n].sum())]
    for k in ("ids", "speakers", "texts", "phonemes"):
        extra[k] = extra[k][:n]
    torch.save(extra, tmp_path / "extra.pt")
    seen = []

    def spy(corpus, *a, **kw):
        ex = make_examples(corpus, *a, **kw)
        seen.append((list(corpus["ids"]), list(corpus["speakers"]), ex))
        return ex
    monkeypatch.setattr(train_codec_lm, "make_examples", spy)
    out = tmp_path / "nar.pt"
    train_codec_lm.main(train_argv(out, "--extra_train", str(tmp_path / "extra.pt"), steps=1, model="nar"))
    ids, speakers, ex = seen[0]  # the first epoch's training examples
    assert ids == base["ids"] + extra["ids"]
    utts = load_corpus(tmp_path / "extra.pt")["utts"]
    for i in range(len(base["ids"]), len(ids)):  # an extra utterance's prompt is cut from one of its own voice's
        prompt = ex[i][1]
        assert any(torch.equal(prompt, u[:, :prompt.shape[1]]) for u, s in zip(utts, extra["speakers"])
                   if s == speakers[i])
    ckpt = torch.load(out, weights_only=True)
    tok = TextTokenizer.build(base["phonemes"], "phonemes")
    assert ckpt["tokenizer"]["symbols"] == tok.symbols and ckpt["args"]["extra_train"] == [str(tmp_path / "extra.pt")]
    with pytest.raises(SystemExit, match=f"{re.escape(str(VAL))}: .* utterance ids are in the training corpus"):
        train_codec_lm.main(train_argv(tmp_path / "b.pt", "--extra_train", str(tmp_path / "extra.pt"), str(VAL),
                                       str(VAL), steps=1))
    other = torch.load(tmp_path / "extra.pt", weights_only=True)
    torch.save(other | {"phonemes": ["D zz"] * n}, tmp_path / "unknown.pt")  # a symbol --train does not have
    with pytest.raises(ValueError, match="utterance .*@x: unknown phoneme symbol 'zz'"):
        train_codec_lm.main(train_argv(tmp_path / "d.pt", "--extra_train", str(tmp_path / "unknown.pt"), steps=1))
    other["codec"] = dict(other["codec"], name="another")
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=f"and {re.escape(str(tmp_path / 'other.pt'))} come from different codecs"):
        train_codec_lm.main(train_argv(tmp_path / "c.pt", "--extra_train", str(tmp_path / "other.pt"), steps=1))


def test_resume_with_drawn_prompts_and_short_first_follows_the_uninterrupted_run(ar_run, tmp_path):
    """Both options over several epochs (uneven_corpus: 2 steps an epoch, so the prompts are redrawn and the
    curriculum ends): a run stopped mid-epoch and resumed reaches the uninterrupted run's losses and weights."""
    data = uneven_corpus(tmp_path / "uneven.pt")
    extra = ("--train", str(data), "--val", str(data), "--prompt_seconds", "1", "--prompt_seconds_min", "0.2",
             "--short_first")
    a, b = tmp_path / "a" / "ar.pt", tmp_path / "b" / "ar.pt"
    a.parent.mkdir(), b.parent.mkdir()
    train(a, *extra, steps=6)
    train(b, *extra, "--stop_after", "3", steps=6)
    train(b, *extra, "--resume", steps=6)
    assert [r["step"] for r in read_log(b)] == list(range(1, 7))
    assert [(r["loss"], r["grad_norm"]) for r in read_log(a)] == [(r["loss"], r["grad_norm"]) for r in read_log(b)]
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa["args"]["short_first"] and sa["args"]["prompt_seconds_min"] == 0.2
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    fixed = torch.load(ar_run, weights_only=True)["args"]  # a run without the options stores the defaults
    assert (fixed["prompt_seconds_min"], fixed["short_first"]) == (3.0, False)


def test_resume_refuses_a_missing_checkpoint_or_other_settings(ar_run, tmp_path):
    """--resume rebuilds the model from the checkpoint's config and tokenizer: a run with another model, corpus,
    shape or data order is refused, naming the file and what differs, before any training."""
    from train_codec_lm import main
    out = tmp_path / "ar.pt"
    with pytest.raises(SystemExit, match=f"--resume: no checkpoint at {re.escape(str(out))}"):
        main(train_argv(out, "--resume"))
    out.write_bytes(ar_run.read_bytes())
    for extra, diff in ((["--model", "nar"], "model: file has 'ar', this run has 'nar'"),
                        (["--train", str(VAL)], f"train: file has '{TRAIN}', this run has '{VAL}'"),
                        (["--text", "letters"], "text: file has 'phonemes'"),
                        (["--d_model", "64", "--n_head", "4"], "d_model: file has 32, this run has 64; n_head: file"),
                        (["--n_layer", "2"], "n_layer: file has 1, this run has 2"),
                        (["--dropout", "0"], "dropout: file has 0.1, this run has 0.0"),
                        (["--seed", "3"], "seed: file has 0, this run has 3"),
                        (["--short_first"], "short_first: file has False, this run has True"),
                        (["--extra_train", str(VAL)], f"extra_train: file has None, this run has ['{VAL}']"),
                        (["--prompt_seconds_min", "1"], "prompt_seconds_min: file has 3.0, this run has 1.0")):
        with pytest.raises(ValueError, match=f"{re.escape(str(out))}: checkpoint made with other settings "
                                             f"\\(.*{re.escape(diff)}"):
            main(train_argv(out, "--resume", *extra))
    assert out.read_bytes() == ar_run.read_bytes()  # nothing was touched
    # a checkpoint from before --prompt_seconds_min / --short_first (fixed prompts, random order) still resumes
    ckpt = torch.load(out, weights_only=True)
    del ckpt["args"]["prompt_seconds_min"], ckpt["args"]["short_first"]
    torch.save(ckpt, out)
    main(train_argv(out, "--resume"))
    with pytest.raises(ValueError, match="short_first: file has False, this run has True"):
        main(train_argv(out, "--resume", "--short_first"))


def test_trim_log_drops_later_steps_and_a_line_cut_short_and_refuses_a_damaged_one(tmp_path):
    from train_codec_lm import trim_log
    path = tmp_path / "ar.pt.log.jsonl"
    recs = [json.dumps({"step": k, "loss": 1.0 / k}) + "\n" for k in (1, 2, 3, 4)]
    path.write_text("".join(recs) + '{"step": 5, "lo')
    trim_log(path, 2)
    assert path.read_text() == "".join(recs[:2])
    path.write_text(recs[0] + '{"step": 2, "lo\n' + recs[2])
    with pytest.raises(SystemExit, match=f"{re.escape(str(path))} line 2 is not a JSON record"):
        trim_log(path, 3)
    assert path.read_text() == recs[0] + '{"step": 2, "lo\n' + recs[2]  # left as it was


def test_a_truncated_file_is_named_as_incomplete(ar_run, tmp_path):
    """A checkpoint, tokenised corpus or codec file cut short says which file and that it is incomplete, instead of
    PyTorch's bare "failed finding central directory" (or an EOFError / UnpicklingError for the first bytes)."""
    from train_codec_lm import main
    for src, load, what in ((ar_run, lambda p: load_model(p, "ar"), "checkpoint"),
                            (TRAIN, load_corpus, "tokenised corpus"),
                            (REPO / "data/toy/codec.pt", MelRVQCodec.load, "toy codec")):
        data = src.read_bytes()
        for n in (0, 1, 100, len(data) // 2, len(data) - 1):
            cut = tmp_path / f"{n}_{src.name}"
            cut.write_bytes(data[:n])
            with pytest.raises(ValueError, match=f"{re.escape(str(cut))}: this {what} file is incomplete or corrupt"):
                load(cut)
    out = tmp_path / "ar.pt"  # --resume reads its checkpoint the same way
    out.write_bytes(ar_run.read_bytes()[:-1])
    with pytest.raises(ValueError, match=f"{re.escape(str(out))}: this checkpoint file is incomplete"):
        main(train_argv(out, "--resume"))


def uneven_corpus(path):
    """A tokenised corpus (two speakers, 2-layer codes) whose length-sorted batches of 4 are 2, 3, 4, 40
    and 41, 42, 43, 90 frames: split over two processes (examples 0, 2 and 1, 3 of a batch), the shards
    hold 3 + 5 = 8 and 4 + 41 = 45 target tokens, then 86 and 134."""
    lengths = [40, 2, 90, 3, 41, 4, 42, 43]
    codes = torch.randint(0, 8, (2, sum(lengths)), generator=torch.Generator().manual_seed(0)).short()
    codec = dict(name="uneven", n_q=2, card=[16, 8], frame_rate=50, sample_rate=16000, params={})
    torch.save(dict(codec=codec, ids=[f"u{i}" for i in range(8)], texts=["a"] * 8,
                    phonemes=["a b", "b c a", "c", "a"] * 2, speakers=["s0", "s1"] * 4, codes=codes,
                    lengths=torch.tensor(lengths)), path)
    return path


def test_ddp_two_processes_gloo_take_the_one_process_step(tmp_path):
    """Two processes (gloo), each on its shard of the global batch, take the step one process takes on the
    whole batch: the same logged loss (the mean over all the batch's tokens), gradient norm, and weights
    after one step and after three, on shards of very different token counts, where averaging the shards'
    own means would give other gradients. No dropout: each process would draw its own masks."""
    data = uneven_corpus(tmp_path / "uneven.pt")
    out, one = tmp_path / "ddp" / "ar.pt", tmp_path / "one" / "ar.pt"
    out.parent.mkdir(), one.parent.mkdir()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    extra = ("--train", str(data), "--val", str(data), "--dropout", "0", "--snapshot_every", "1")
    train(out, *extra, steps=3, launcher=launcher)
    train(one, *extra, steps=3)
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["step"] == 3 and ckpt["kind"] == "ar"
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the bare model, not the DDP wrapper
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]  # only rank 0 writes
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log) and "val_loss" in log[-1]
    model, _, _ = load_model(out, "ar")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the shards are as uneven as uneven_corpus says (targets: frames + EOS)
    from train_codec_lm import batch_for_step, get_args
    corpus, args = load_corpus(data), get_args(train_argv(one, *extra))
    ex = make_examples(corpus, TextTokenizer.build(corpus["phonemes"]), frame_rate=50)
    shards = [batch_for_step(Identity(), lambda s: ex, step, args, 2, r, "cpu") for step in (0, 1) for r in (0, 1)]
    counts = [sum(g.shape[1] + 1 for _, _, g in shard) for shard in shards]
    assert sorted(zip(counts[::2], counts[1::2])) == [(8, 45), (86, 134)]
    # the same steps as one process
    for a, b in zip(log, read_log(one), strict=True):
        assert a.keys() == b.keys()
        for key, tol in (("loss", 2e-5), ("grad_norm", 2e-4), ("val_loss", 2e-5)):  # logged to 5, 4, 5 places
            assert a.get(key) == pytest.approx(b.get(key), abs=tol), (key, a, b)
    for k in (1, 3):
        a, b = (torch.load(p.parent / f"ar.step{k}.pt", weights_only=True)["model"] for p in (out, one))
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5, msg=f"step {k}: {name}")


def test_position_limits_are_options_and_utterances_that_do_not_fit_are_skipped(tmp_path):
    """--max_text and --max_audio size the position tables and are stored in the checkpoint. An utterance whose
    3 s prompt (150 frames, the longest make_examples cuts) + target + EOS exceeds --max_audio is skipped and
    counted once; the run trains on the others (given one of them, the model would raise at its first batch)."""
    utts = load_corpus(TRAIN)["utts"]
    n = sum(150 + u.shape[1] + 1 > 311 for u in utts)
    assert 0 < n < len(utts)
    for model in ("ar", "nar"):
        out = tmp_path / f"{model}.pt"
        r = train(out, "--max_text", "80", "--max_audio", "311", model=model, steps=2)
        assert f"{TRAIN}: {n} of {len(utts)} utterances skipped, longer than the model's positions (80 text, 311 " \
               "audio frames; e.g." in r.stdout
        ckpt = torch.load(out, weights_only=True)
        assert (ckpt["config"]["max_text"], ckpt["config"]["max_audio"]) == (80, 311)
        assert ckpt["model"]["text_pos.weight"].shape[0] == 80
        assert ckpt["model"]["audio_pos.weight"].shape[0] == ckpt["model"]["prompt_pos.weight"].shape[0] == 311


def test_snapshots_and_bf16_autocast(tmp_path):
    """--snapshot_every keeps loadable weights of those steps (no optimizer); --precision bf16 trains on the CPU
    with fp32 master weights and a finite loss close to the fp32 run's."""
    out = tmp_path / "ar.pt"
    train(out, "--snapshot_every", "3", "--precision", "bf16", steps=6)
    snaps = sorted(tmp_path.glob("ar.step*.pt"))
    assert [p.name for p in snaps] == ["ar.step3.pt", "ar.step6.pt"]
    snap = torch.load(snaps[0], weights_only=True)
    assert snap["step"] == 3 and "optimizer" not in snap and snap["kind"] == "ar"
    model, _, _ = load_model(snaps[1], "ar")
    final = torch.load(out, weights_only=True)["model"]
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())  # step 6 = the final weights
    assert all(v.dtype == torch.float32 for v in final.values() if v.is_floating_point())
    fp32 = tmp_path / "fp32" / "ar.pt"
    fp32.parent.mkdir()
    train(fp32, steps=6)
    a, b = read_log(out), read_log(fp32)
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=0.02) and a[0]["loss"] != b[0]["loss"]


def test_export_writes_bf16_weights_that_load(ar_run, tmp_path):
    """--export on a finished run (--resume with nothing left to train) writes the shipped form: bf16 weights,
    no optimizer, loadable by load_model into an fp32 model whose outputs match the fp32 one's closely."""
    out = tmp_path / "ar.pt"
    out.write_bytes(ar_run.read_bytes())
    train(out, "--resume", "--export", str(tmp_path / "shipped.pt"))
    shipped = torch.load(tmp_path / "shipped.pt", weights_only=True)
    assert "optimizer" not in shipped and shipped["step"] == 8
    assert all(v.dtype == torch.bfloat16 for v in shipped["model"].values() if v.is_floating_point())
    full, _, _ = load_model(ar_run, "ar")
    small, tok, _ = load_model(tmp_path / "shipped.pt", "ar")
    assert next(small.parameters()).dtype == torch.float32
    ex = [(tok.encode("D @2 | k w ' I k"), torch.randint(0, 1024, (8, 6)), torch.randint(0, 1024, (1, 5)))]
    with torch.no_grad():
        a, b = full(**full.batch(ex)), small(**small.batch(ex))
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)


def test_save_checkpoint_makes_its_folder_and_leaves_no_temp_file(tmp_path):
    """A checkpoint path whose folder does not exist yet (--export into a new folder) is written, atomically."""
    from speechalign import save_checkpoint
    path = tmp_path / "new" / "deeper" / "ar.pt"
    save_checkpoint(str(path), kind="ar", step=3, w=torch.arange(4))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 3 and torch.equal(ckpt["w"], torch.arange(4))
    assert sorted(p.name for p in path.parent.iterdir()) == ["ar.pt"]
