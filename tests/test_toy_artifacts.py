"""The shipped toy artefacts load from a fresh clone with weights_only=True and agree with each other."""
import os

from dataclasses import fields

import pytest
import torch

import reproduce
from codec import MelRVQCodec, load_corpus
from speechalign import load_model, make_examples, read_checkpoint, sequence_logps
from train_codec_lm import TrainArgs, get_args

TOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "toy")


@pytest.fixture(scope="module")
def codec():
    return MelRVQCodec.load(os.path.join(TOY, "codec.pt"))


@pytest.mark.parametrize("split, min_utts, speakers", [
    ("test_seen", 300, 6), ("test_unseen", 300, 2), ("dev_seen", 200, 6), ("dev_unseen", 200, 2),
    ("dev_oog", 100, 6), ("train_subset", 3000, 6)])
def test_corpus_matches_codec(codec, split, min_utts, speakers):
    corpus = load_corpus(os.path.join(TOY, f"{split}.pt"))
    assert corpus["codec"]["name"] == codec.name  # codes from this exact codebook
    assert len(corpus["ids"]) >= min_utts and len(set(corpus["speakers"])) == speakers
    assert len(corpus["utts"]) == len(corpus["texts"]) == len(corpus["phonemes"]) == len(corpus["ids"])
    assert all(t.strip() for t in corpus["texts"]) and all(p.strip() for p in corpus["phonemes"])
    codes = corpus["codes"].long()
    assert codes.shape[0] == codec.n_q
    for q, card in enumerate(codec.card):
        assert 0 <= codes[q].min() and codes[q].max() < card
    seconds = corpus["lengths"].float() / codec.frame_rate
    assert 1.0 < seconds.min() and seconds.max() < 8.0


def test_splits_do_not_share_sentences_and_unseen_speakers_stay_unseen():
    names = ["train_subset", "dev_seen", "dev_unseen", "dev_oog", "test_seen", "test_unseen"]
    splits = {s: load_corpus(os.path.join(TOY, f"{s}.pt")) for s in names}
    for i, a in enumerate(names):  # dev chooses, test reports: no sentence in two of them, nor in training
        for b in names[i + 1:]:
            assert not set(splits[a]["texts"]) & set(splits[b]["texts"]), (a, b)
    train = set(splits["train_subset"]["speakers"])
    for s in ("dev_seen", "dev_oog", "test_seen"):
        assert set(splits[s]["speakers"]) == train
    for s in ("dev_unseen", "test_unseen"):
        assert not set(splits[s]["speakers"]) & train


def test_shipped_size():
    total = sum(os.path.getsize(os.path.join(TOY, f)) for f in os.listdir(TOY))
    assert total < 40e6  # data, codec and the bf16 SFT checkpoints (~18 MB of them): a clone stays small


def test_sft_checkpoints_load_and_agree(codec):
    """The shipped SFT AR and NAR read the same text ids, were trained on this codec's codes, and run."""
    ar, tok, ar_ck = load_model(os.path.join(TOY, "sft_ar.pt"), "ar")
    nar, nar_tok, nar_ck = load_model(os.path.join(TOY, "sft_nar.pt"), "nar")
    assert ar_ck["codec"]["name"] == nar_ck["codec"]["name"] == codec.name
    assert tok.symbols == nar_tok.symbols and tuple(ar.cfg.card) == tuple(codec.card)
    assert "optimizer" not in ar_ck and "optimizer" not in nar_ck  # the shipped form: weights only
    seen = load_corpus(os.path.join(TOY, "test_seen.pt"))
    ex = make_examples(seen, tok, 3.0)[:2]  # the prompt length evaluation uses
    with torch.no_grad():
        b = ar.batch(ex)
        mask = b["targets"] != -100
        nll = -(sequence_logps(ar(**b), b["targets"], mask).sum() / mask.sum()).item()
    assert nll < 3.0  # trained: a uniform guess over 1025 tokens would be 6.9 nats


# every training argument shapes the weights but these: paths, logging, snapshots, resuming, and threads (they
# change the last bits of a float sum, not the recipe); precision and extra corpora are compared on their own below
NOT_RECIPE = {"out", "train", "extra_train", "val", "eval_every", "eval_utts", "ckpt_every", "snapshot_every", "threads", "resume",
              "export", "stop_after", "precision"}
RECIPE = [f.name for f in fields(TrainArgs) if f.name not in NOT_RECIPE]


@pytest.mark.parametrize("model", ["ar", "nar"])
def test_sft_checkpoints_come_from_the_toy_preset(model):
    """The shipped SFT checkpoint was trained as `reproduce.py --from_scratch` trains it: with the toy preset's
    arguments, to its last step. A model trained otherwise, or a preset changed without retraining, would make
    the claim that the from-scratch path rebuilds the shipped artefacts false."""
    preset = get_args(["--model", model, "--out", "x.pt", *reproduce.PRESETS["toy"][model]])
    ck = read_checkpoint(os.path.join(TOY, f"sft_{model}.pt"), model)
    assert ck["step"] == preset.steps
    assert {k: ck["args"][k] for k in RECIPE} == {k: getattr(preset, k) for k in RECIPE}
    # the preset's "auto" precision is fp32 on a CPU, where the shipped models were trained
    assert ck["args"]["precision"] == {"auto": "fp32"}.get(preset.precision, preset.precision)
    # reproduce.from_scratch trains the AR on the training split alone and the NAR also on two more corpora of the
    # same codec: the training audio heard as tapes and the codec_fit split's voices (--extra_train)
    extra = [os.path.basename(f) for f in ck["args"].get("extra_train") or []]
    assert extra == ({"ar": [], "nar": ["train_tape.pt", "codec_fit.pt"]}[model])
