"""SpeechAlign (Zhang et al., NeurIPS 2024) in one file: a codec language model for zero-shot TTS
and its preference alignment.

Part 1, the codec LM (the paper's section 2 and VALL-E):
  - text in: phonemes (or letters) -> integer ids;
  - AR: one causal transformer over [text | prompt layer-1 codes | target layer-1 codes | EOS];
  - NAR: one bidirectional transformer that fills in layers 2..Q of the target, one layer at a time;
  - sequence_logps: the summed log-probability of chosen tokens -- what DPO and evaluation read;
  - sampling: batched AR generation with a KV cache (the inference-speed part: skip it on a first
    reading), greedy NAR decoding, codes -> waveform.

Part 2, SpeechAlign (the paper's section 3), under the `ALGO LOGIC` marker, in the order it runs:
pairs -> reference log-probs -> dpo_loss -> dpo_step -> train_round -> align (the iterative loop):
  - pairs: chosen = golden layer-1 codes, rejected = K samples of the current AR for the same text
    and prompt;
  - dpo_loss (DPO, conservative DPO, IPO) and a DPO round against a frozen copy of the AR;
  - the iterative loop (round t samples from AR_t and uses it as the reference) and the paper's
    control, continued supervised training on the same golden codes at the same budget.

    python speechalign.py --init data/toy/sft_ar.pt --out runs/toy/align --precision bf16
    python speechalign.py --init data/toy/sft_ar.pt --out runs/toy/control --control \
        --precision bf16

Everything runs on one GPU or the CPU. `train_codec_lm.py` pretrains the two models; `eval.py`
judges them.
"""
import argparse
import json
import math
import os
import random
import time
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from codec import atomic_write, load_corpus, load_pt, write_text

# -------------------------------------------------------------------------------------------------
# Text tokenizer. Phonemes are the default: at toy scale an early prototype could not learn how
# letters sound in the compute we have. The toy corpus stores espeak-ng phonemes
# ("D @2 | k w ' I k": phonemes and stress marks split by spaces, words by "|"; the shipped corpus
# files still fuse stress into the vowel); for the real setting data/make_manifest.py writes the
# same format.

PAD = "<pad>"
LETTERS = list("abcdefghijklmnopqrstuvwxyz' ")


class TextTokenizer:
    """Maps a phoneme string (kind="phonemes") or a text (kind="letters") to ids; id 0 is padding.

    The phoneme vocabulary is every symbol of the training corpus, sorted, and it is saved with each
    checkpoint. A symbol outside the vocabulary is an error naming it and the utterance: silently
    dropping a phoneme would teach the model to skip sounds. Letters: the text is lower-cased and
    runs of spaces collapse; any character outside a-z, apostrophe and space is an error.
    """

    def __init__(self, symbols, kind="phonemes"):
        if kind not in ("phonemes", "letters"):
            raise ValueError(f"unknown tokenizer kind {kind!r}: use 'phonemes' or 'letters'")
        self.kind, self.symbols = kind, [PAD] + [s for s in symbols if s != PAD]
        self.index = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def build(cls, strings, kind="phonemes"):
        if kind == "letters":
            return cls(LETTERS, kind)
        return cls(sorted({s for text in strings for s in text.split()}), kind)

    def split(self, text):
        return text.split() if self.kind == "phonemes" else list(" ".join(text.lower().split()))

    def encode(self, text, utt="?"):
        symbols = self.split(text)
        if not symbols:
            raise ValueError(f"utterance {utt}: empty {self.kind}")
        for s in symbols:
            if s not in self.index:
                raise ValueError(f"utterance {utt}: unknown {self.kind[:-1]} symbol {s!r} (not in "
                                 f"the {len(self.symbols)}-symbol vocabulary of this model)")
        return [self.index[s] for s in symbols]


# -------------------------------------------------------------------------------------------------
# The transformer. Both models read one sequence per example: [text | acoustic prompt | target].
# Text and audio have their own embedding tables, and each of the three segments has its own
# position table, so position 5 of the text, of the prompt and of the target are never confused.
# The target's positions start at 0 whatever the prompt's length (the prompt's count back from it,
# -1 its last frame): the AR always knows where the prompt ends and its own speech begins, and
# target frame t keeps the same relation to the text positions for every prompt. With one table
# numbering prompt and target on from each other, prompts of drawn lengths (pretraining) hid that
# boundary, and the AR was slow to learn to read the text. Batches are padded; `valid` marks real
# tokens.

@dataclass
class LMConfig:
    n_text: int  # text vocabulary size (with padding)
    card: tuple  # codebook size of each codec layer
    d_model: int = 256
    n_layer: int = 6
    n_head: int = 4
    dropout: float = 0.1  # residual and MLP dropout; none in attention (it forces a slow SDPA path)
    max_text: int = 256  # text positions (train_codec_lm.py --max_text)
    max_audio: int = 1024  # audio frames: prompt + target (+ EOS); see too_long


class Block(nn.Module):
    """Pre-norm transformer block. `cache`, when given, is a dict {"size": positions} in which the
    block keeps its keys and values: buffers of `size` positions, written in place, so a step copies
    nothing it cached before."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, cache=None):
        B, T, C = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if cache is not None:
            if "k" not in cache:
                cache["k"] = k.new_empty(B, self.n_head, cache["size"], C // self.n_head)
                cache["v"], cache["n"] = torch.empty_like(cache["k"]), 0
            s, n = cache["n"], cache["n"] + T
            cache["k"][:, :, s:n], cache["v"][:, :, s:n], cache["n"] = k, v, n
            k, v = cache["k"][:, :, :n], cache["v"][:, :, :n]
        # mask [B, T, T_keys], or None for plain causal attention over an uncached sequence (no mask
        # to build or read)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=mask is None,
                                           attn_mask=None if mask is None else mask.unsqueeze(1))
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.mlp(self.ln2(x))


class CodecLM(nn.Module):
    """What AR and NAR share: embeddings for text and audio, positions, blocks, a final norm."""

    def __init__(self, cfg, n_audio_in):
        super().__init__()
        self.cfg = cfg
        self.text_emb = nn.Embedding(cfg.n_text, cfg.d_model)
        self.audio_emb = nn.ModuleList(nn.Embedding(n, cfg.d_model) for n in n_audio_in)
        self.text_pos = nn.Embedding(cfg.max_text, cfg.d_model)
        self.audio_pos = nn.Embedding(cfg.max_audio, cfg.d_model)  # target frames 0, 1, ...
        # prompt frames -1, -2, ... at rows 0, 1, ...
        self.prompt_pos = nn.Embedding(cfg.max_audio, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def embed(self, text, audio, is_audio, pos):
        """text [B, T] ids (read where not is_audio); audio [B, q, T] codes (where is_audio);
        pos [B, T] positions: from 0 in the text and the target, negative in the prompt (pack)."""
        cfg = self.cfg
        audio_out = (pos >= cfg.max_audio) | (pos < -cfg.max_audio)
        if ((pos >= cfg.max_text) & ~is_audio).any() or (audio_out & is_audio).any():
            raise ValueError(f"sequence longer than the model's positions ({cfg.max_text} text, "
                             f"{cfg.max_audio} audio)")
        # sum the embeddings of the layers given; a code of -1 means "this layer is not given here"
        a = sum(emb(audio[:, q].clamp(min=0)) * (audio[:, q] >= 0).unsqueeze(-1)
                for q, emb in enumerate(self.audio_emb[: audio.shape[1]]))
        x_text = self.text_emb(text.clamp(min=0)) + self.text_pos(pos.clamp(0, cfg.max_text - 1))
        in_prompt = (pos < 0).unsqueeze(-1)
        x_audio = a + torch.where(in_prompt, self.prompt_pos((-1 - pos).clamp(min=0)),
                                  self.audio_pos(pos.clamp(min=0)))
        return self.drop(torch.where(is_audio.unsqueeze(-1), x_audio, x_text))

    def trunk(self, x, mask, caches=None):
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None if caches is None else caches[i])
        return self.ln_f(x)


def attention_mask(valid, causal):
    """[B, T, T] boolean: query t may attend key s if s is a real token (and s <= t when causal).

    Every position may attend itself, so a padding row never has all its keys masked (that gives
    NaN, and 0 * NaN in the next layer's attention would leak it into real rows)."""
    T = valid.shape[1]
    mask = valid.unsqueeze(1).expand(-1, T, -1)
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    return mask | torch.eye(T, dtype=torch.bool, device=valid.device)


def autocast(precision, device):
    """bf16 autocast, or none; sequence log-probs are fp32 either way. In DPO the reference's
    log-probs, the policy's during training and the after-training metrics must come from the same
    precision, or pi != pi_ref at the first step and the rewards start at noise, not at 0."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == "bf16")


# -------------------------------------------------------------------------------------------------
# Examples and acoustic prompts. An example is (text ids, prompt codes [Q, Lp], target codes
# [Q, Lg]). The prompt is, as in VALL-E's evaluation, about 3 s of *another* utterance of the same
# speaker ("cross-sentence"). Pretraining may draw each example's prompt length
# (prompt_seconds_min), as VALL-E trains, so that the AR does not learn one prompt length;
# evaluation and SpeechAlign use a fixed one.

def make_examples(corpus, tok, prompt_seconds=3.0, seed=0, frame_rate=50, prompt_seconds_min=None):
    """The examples of a tokenised corpus, one per utterance, with prompts of prompt_seconds or,
    given prompt_seconds_min, of a length drawn uniformly (in frames) from [prompt_seconds_min,
    prompt_seconds] per utterance. The lengths come from their own generator, so the prompt
    utterances are the fixed-length case's and a fixed length (the default) draws nothing: its
    examples are those of a run without this option."""
    rng = random.Random(seed)
    n_prompt = int(prompt_seconds * frame_rate)
    n_min = n_prompt if prompt_seconds_min is None else int(prompt_seconds_min * frame_rate)
    if prompt_seconds_min is not None and not 0 < n_min <= n_prompt:
        raise ValueError(f"prompt lengths: need 0 < prompt_seconds_min <= prompt_seconds (in "
                         f"frames at {frame_rate} Hz: 0 < {n_min} <= {n_prompt})")
    lengths = random.Random(f"prompt lengths {seed}")
    by_spk = {}
    for i, spk in enumerate(corpus["speakers"]):
        by_spk.setdefault(spk, []).append(i)
    texts = corpus["phonemes"] if tok.kind == "phonemes" else corpus["texts"]
    examples = []
    for i, codes in enumerate(corpus["utts"]):
        text = tok.encode(texts[i], corpus["ids"][i])
        n = n_prompt if n_min == n_prompt else lengths.randint(n_min, n_prompt)
        others = [j for j in by_spk[corpus["speakers"][i]] if j != i]
        if not others:
            raise ValueError(f"utterance {corpus['ids'][i]}: its speaker has no other utterance to "
                             f"prompt with")
        j = rng.choice(others)
        examples.append((text, corpus["utts"][j][:, :n], codes))
    return examples


def too_long(example, max_text, max_audio, prompt_frames=None):
    """Why an example (text ids, prompt [Q, Lp], target [Q, Lg]) does not fit a model's positions,
    or None.

    The one rule, in pretraining, pair construction and evaluation alike: an example whose text is
    longer than max_text, or whose prompt + target + EOS is longer than max_audio frames, is skipped
    (the caller counts it), never cropped: a cropped target would teach the AR to stop mid-sentence,
    and a cropped text would no longer say what the audio says. prompt_frames, if given, stands for
    the example's own prompt length (pretraining passes the longest prompt an epoch can draw, so
    that every epoch keeps the same utterances)."""
    text, prompt, target = example
    lp = prompt.shape[1] if prompt_frames is None else prompt_frames
    if len(text) > max_text:
        return f"{len(text)} text tokens > {max_text}"
    if lp + target.shape[1] + 1 > max_audio:
        return f"prompt {lp} + target {target.shape[1]} + EOS > {max_audio} audio frames"
    return None


# -------------------------------------------------------------------------------------------------
# sequence_logps: log p(y | x) = sum over scored positions t of log softmax(logits_t)[y_t].
# Computed in fp32 (bf16/fp16 log-softmax loses the small differences DPO lives on). Targets at
# unscored positions may hold anything (-100, padding); they are replaced before indexing, never
# used as indices.

def sequence_logps(logits, targets, mask):
    logp = logits.float().log_softmax(-1)
    picked = logp.gather(-1, torch.where(mask, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, 0.0).sum(-1)


def lm_loss(model, b):
    """Supervised loss of an AR or NAR batch: mean cross-entropy per scored token (targets != -100),
    in fp32. The output head and the log-softmax run at the scored positions alone: text and
    prompt positions (about 40% of a toy AR batch) need neither. `model` may be wrapped
    (DistributedDataParallel): the forward goes through the wrapper."""
    scored = b["targets"] != -100
    return F.cross_entropy(model(**b, scored=scored).float(), b["targets"][scored])


def pack(examples, n_layers):
    """The right-padded layout AR and NAR batches share: per example [text | prompt | target],
    text ids and positions filled in, audio codes all -1 (absent) for the caller to fill, targets
    all -100 (unscored). Returns the tensors and each example's (text, prompt, target) lengths."""
    spans = [(len(t), p.shape[1], g.shape[1]) for t, p, g in examples]
    B, T = len(examples), max(map(sum, spans))
    b = dict(text=torch.zeros(B, T, dtype=torch.long),
             audio=torch.full((B, n_layers, T), -1, dtype=torch.long),
             is_audio=torch.zeros(B, T, dtype=torch.bool), pos=torch.zeros(B, T, dtype=torch.long),
             valid=torch.zeros(B, T, dtype=torch.bool),
             targets=torch.full((B, T), -100, dtype=torch.long))
    for i, ((t, _, _), (lt, lp, lg)) in enumerate(zip(examples, spans)):
        b["text"][i, :lt] = torch.tensor(t)
        b["is_audio"][i, lt:lt + lp + lg] = True
        b["pos"][i, :lt] = torch.arange(lt)
        b["pos"][i, lt:lt + lp + lg] = torch.arange(-lp, lg)  # prompt -lp..-1, target 0..lg-1
        b["valid"][i, :lt + lp + lg] = True
    return b, spans


# -------------------------------------------------------------------------------------------------
# AR: p(c_1 | text, prompt) = prod_t p(c_1[t] | text, prompt layer 1, c_1[<t]), then EOS.

class AR(CodecLM):
    def __init__(self, cfg):
        super().__init__(cfg, n_audio_in=[cfg.card[0] + 1])
        self.eos = cfg.card[0]
        self.head = nn.Linear(cfg.d_model, cfg.card[0] + 1, bias=False)

    def batch(self, examples, device="cpu", eos=None):
        """Right-padded [text | prompt | target] sequences; `targets` are the next audio token (or
        EOS) at the positions that predict the target and EOS, -100 elsewhere, so text and prompt
        are never scored. eos: one bool per example, whether its target ends with a scored EOS
        (default: all do). A sample cut at the sampler's length limit never emitted one: its target
        codes alone are scored."""
        b, spans = pack(examples, n_layers=1)
        eos = [True] * len(examples) if eos is None else eos
        for i, ((_, p, g), (lt, lp, lg), e) in enumerate(zip(examples, spans, eos)):
            b["audio"][i, 0, lt:lt + lp + lg] = torch.cat([p[0], g[0]])
            start = lt + lp - 1  # the last prompt token predicts the first target code
            y = torch.cat([g[0], torch.tensor([self.eos])]) if e else g[0]
            b["targets"][i, start:start + len(y)] = y
        return {k: v.to(device) for k, v in b.items()}

    def forward(self, text, audio, is_audio, pos, valid, caches=None, mask=None, scored=None, **_):
        """Logits [B, T, V]; given `scored` (bool [B, T]), those of its positions alone: [N, V]."""
        x = self.embed(text, audio, is_audio, pos)
        if mask is None and (caches is not None or (valid[:, 1:] & ~valid[:, :-1]).any()):
            mask = attention_mask(valid, causal=True)
        # else right-padded (training, scoring): causal attention alone never lets a real token see
        # padding
        x = self.trunk(x, mask, caches)
        return self.head(x if scored is None else x[scored])

    # --- the inference-speed part: batched sampling with a KV cache (a reader may skip it) -------
    @torch.no_grad()
    def generate(self, texts, prompts, temperature=1.0, top_k=None, top_p=None,
                 seconds_per_token=0.16, *, frame_rate, use_cache=True, generator=None,
                 return_logits=False):
        """Sample layer-1 codes for each (text ids, prompt codes [Q, Lp]); batched, with a KV cache.

        Prefixes [text | prompt] are left-padded so that every sequence's next token lands in the
        same column. Each sequence stops at its own EOS or at its length limit (then `hit_limit`):
        frame_limit's frames for its text, and never past the audio positions. frame_rate is the
        codec's frames per second (callers pass the checkpoint's or the corpus's
        codec["frame_rate"]); it has no default, so that no caller can sample a 75 Hz model with a
        50 Hz limit. temperature 0 is greedy.
        Returns (list of LongTensor [T_i], hit_limit BoolTensor [B]).
        """
        dev = self.head.weight.device
        B = len(texts)
        lt = torch.tensor([len(t) for t in texts])
        lp = torch.tensor([p.shape[1] for p in prompts])
        if (lt > self.cfg.max_text).any() or (lp >= self.cfg.max_audio).any():
            raise ValueError(f"a text or prompt leaves no room to sample in the model's positions "
                             f"({self.cfg.max_text} text, {self.cfg.max_audio} audio): skip it "
                             f"first (too_long)")
        P = int((lt + lp).max())
        limit = torch.minimum(torch.tensor([frame_limit(seconds_per_token, frame_rate, n)
                                            for n in lt.tolist()]), self.cfg.max_audio - lp)
        text = torch.zeros(B, P, dtype=torch.long)
        audio = torch.full((B, 1, P), -1, dtype=torch.long)
        is_audio = torch.zeros(B, P, dtype=torch.bool)
        pos = torch.zeros(B, P, dtype=torch.long)
        valid = torch.zeros(B, P, dtype=torch.bool)
        for i, (t, p) in enumerate(zip(texts, prompts)):
            s = P - lt[i] - lp[i]  # left padding
            text[i, s:s + lt[i]] = torch.tensor(t)
            audio[i, 0, P - lp[i]:] = p[0]
            is_audio[i, P - lp[i]:] = True
            pos[i, s:s + lt[i]] = torch.arange(lt[i])
            pos[i, P - lp[i]:] = torch.arange(-lp[i], 0)
            valid[i, s:] = True
        text, audio, is_audio, pos, valid = (x.to(dev) for x in (text, audio, is_audio, pos, valid))
        limit = limit.to(dev)
        caches = [dict(size=P + int(limit.max())) for _ in self.blocks] if use_cache else None
        out = torch.zeros(B, 0, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        hit_limit = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        step_logits = [] if return_logits else None
        feed = (text, audio, is_audio, pos)
        mask = attention_mask(valid, causal=True)
        for step in range(int(limit.max())):
            logits = self(*feed, valid, caches=caches, mask=mask)[:, -1].float()
            if return_logits:
                step_logits.append(logits)
            nxt = sample(logits, temperature, top_k, top_p, generator)
            is_eos = nxt == self.eos
            ended = ~done & (is_eos | (step + 1 >= limit))
            lengths = torch.where(ended, torch.where(is_eos, step, step + 1), lengths)
            hit_limit |= ended & ~is_eos
            done |= ended
            out = torch.cat([out, torch.where(nxt == self.eos, 0, nxt).unsqueeze(1)], 1)
            if done.all():
                break
            # the next input column: the sampled code at target position step (step < the
            # largest limit <= max_audio: in the table). A finished sequence is still fed; its
            # codes are dropped
            new = (torch.zeros(B, 1, dtype=torch.long, device=dev), out[:, -1:].unsqueeze(1),
                   torch.ones(B, 1, dtype=torch.bool, device=dev),
                   torch.full((B, 1), step, dtype=torch.long, device=dev))
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
            if use_cache:
                feed, mask = new, valid.unsqueeze(1)  # one query row: it sees every real key
            else:
                feed = tuple(torch.cat([a, b], -1) for a, b in zip(feed, new))
                mask = attention_mask(valid, causal=True)
        codes = [out[i, :lengths[i]].cpu() for i in range(B)]
        return (codes, hit_limit.cpu(), step_logits) if return_logits else (codes, hit_limit.cpu())


def frame_limit(seconds_per_token, frame_rate, n_text):
    """The sampling length limit of a text of n_text tokens: ceil(seconds_per_token * frame_rate *
    n_text) frames. In seconds per token, so that one setting serves any codec: 0.16 s is 8 frames
    at the toy codec's 50 Hz and 12 at EnCodec's 75 Hz. Rounded to 1e-6 frames before the ceiling,
    because float products are not exact (0.16 * 7 * 50 is 56.00000000000001, which must not give
    57 frames)."""
    return math.ceil(round(seconds_per_token * frame_rate * n_text, 6))


# Default sampling of inference (eval.py, synthesize.py); SpeechAlign's rejected samples take its
# top-k and length limit but their own temperature (AlignArgs.temperature). Temperature 0.3 was
# chosen on the dev splits for the shipped 5,000-step AR (data/README.md): it reads better than
# 0.5 and than greedy decoding, with the same speaker similarity. Above 0.5 WER climbs steeply (at
# 1.0 it is at chance); greedy decoding gets stuck now and then and runs to the length limit.
# Top-k 50 cuts the long tail of a 1024-code layer. The length limit, 0.16 s per text token, was 8
# frames per token, set on the toy codec at 50 Hz.
SAMPLING = dict(temperature=0.3, top_k=50, top_p=None, seconds_per_token=0.16)


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits [B, V]: temperature, then top-k, then nucleus (top-p)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, -float("inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# -------------------------------------------------------------------------------------------------
# NAR: p(c_j | text, prompt, c_<j) = prod_t p(c_j[t] | ...), for j = 2..Q, all frames at once.
# Input frames are sums of layer embeddings: all Q layers for the prompt, layers < j for the target;
# an embedding of j is added everywhere so that one network serves every layer; one output head per
# layer.

class NAR(CodecLM):
    def __init__(self, cfg):
        super().__init__(cfg, n_audio_in=list(cfg.card))
        self.layer_emb = nn.Embedding(len(cfg.card), cfg.d_model)
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, n, bias=False) for n in cfg.card[1:])

    def batch(self, examples, j, device="cpu"):
        """Sequences [text | prompt (all layers) | target (layers < j)] for predicting layer j
        (0-based, 1..Q-1); `targets` hold layer j's codes at the target frames, -100 elsewhere."""
        b, spans = pack(examples, n_layers=len(self.cfg.card))
        for i, ((_, p, g), (lt, lp, lg)) in enumerate(zip(examples, spans)):
            b["audio"][i, :, lt:lt + lp] = p
            b["audio"][i, :j, lt + lp:lt + lp + lg] = g[:j]
            if g.shape[0] > j:  # training: the answer is known
                b["targets"][i, lt + lp:lt + lp + lg] = g[j]
        return {k: v.to(device) for k, v in b.items()} | {"j": j}

    def forward(self, text, audio, is_audio, pos, valid, j, scored=None, **_):
        """Layer j's logits [B, T, card_j]; given `scored` (bool [B, T]), its positions' alone."""
        x = self.embed(text, audio, is_audio, pos) + self.layer_emb.weight[j]
        x = self.trunk(x, attention_mask(valid, causal=False))
        return self.heads[j - 1](x if scored is None else x[scored])

    @torch.no_grad()
    def generate(self, texts, prompts, layer1, precision="fp32", expected=None):
        """Greedy layers 2..Q for each (text, prompt [Q, Lp], layer-1 codes [T]) -> list of codes
        [Q, T]. Each layer is one full pass over the batch, bound by its matmuls, which bf16
        autocast speeds up on hardware with bf16 matrix units (the toy NAR trained under bf16
        autocast too).

        expected: the codec's tables (codec.tables(): [card_j, D] per layer) to also return, per
        example, the expected upper layers sum_{j>=2} sum_c p_j(c) tables_j[c], float [T, D], for
        codec.decode(codes[:1], upper=...); the passes still feed each layer's argmax codes to the
        next. Why: where the NAR is unsure (toy upper-layer losses near their unigram entropy) its
        argmax is a guess; the mean of what it considers likely lost less: on the dev splits, golden
        layer 1 + the toy NAR went from WER 0.89 (argmax) to 0.79 (expected), below layer 1 alone
        (0.82), so evaluation and synthesis decode this way by default (data/README.md has the
        table). Returns (codes, uppers) then."""
        dev = self.layer_emb.weight.device
        Q = len(self.cfg.card)
        if expected is not None and [t.shape[0] for t in expected] != list(self.cfg.card):
            raise ValueError(f"expected: the codec's tables have {[t.shape[0] for t in expected]} "
                             f"entries per layer, the NAR predicts {list(self.cfg.card)}")
        codes = [c.view(1, -1).to(dev) for c in layer1]
        if expected is not None:
            uppers = [torch.zeros(c.shape[1], expected[0].shape[1], device=dev) for c in codes]
        for j in range(1, Q):
            b = self.batch([(t, p, c) for t, p, c in zip(texts, prompts, codes)], j, device=dev)
            with autocast(precision, dev):
                logits = self(**b)
            pred = logits.argmax(-1)
            starts = [len(t) + p.shape[1] for t, p in zip(texts, prompts)]
            if expected is not None:
                table = expected[j].to(dev, torch.float32)
                uppers = [u + logits[i, s:s + c.shape[1]].float().softmax(-1) @ table
                          for i, (u, s, c) in enumerate(zip(uppers, starts, codes))]
            codes = [torch.cat([c, pred[i, s:s + c.shape[1]].unsqueeze(0)])
                     for i, (s, c) in enumerate(zip(starts, codes))]
        codes = [c.cpu() for c in codes]
        return codes if expected is None else (codes, [u.cpu() for u in uppers])


# -------------------------------------------------------------------------------------------------
# From (text, prompt) to codes: AR samples layer 1, NAR fills in 2..Q (codec.decode_codes makes the waveform).

@torch.no_grad()
def synthesise(ar, nar, texts, prompts, nar_precision="fp32", expected=None, **sampling):
    """Returns (codes [Q, T_i] per example, hit_limit [B]), then with `expected` (the codec's
    tables, see NAR.generate) the expected upper layers [T_i, D], which the codec decodes on top of
    layer 1 (codec.decode_codes). The AR samples in fp32: its one-token steps are too small to gain
    from bf16 (they were slower under autocast)."""
    layer1, hit_limit = ar.generate(texts, prompts, **sampling)
    # an immediate EOS: 1 frame
    layer1 = [c if len(c) else torch.zeros(1, dtype=torch.long) for c in layer1]
    if expected is None:
        codes, uppers = nar.generate(texts, prompts, layer1, nar_precision), [None] * len(layer1)
    else:
        codes, uppers = nar.generate(texts, prompts, layer1, nar_precision, expected)
    return (codes, hit_limit) if expected is None else (codes, hit_limit, uppers)


# -------------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and numbers, written atomically, read with weights_only=True.

def save_checkpoint(path, **state):
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path, kind, device="cpu", mmap=False):
    """The stored dict of a checkpoint that holds a `kind` ("ar" or "nar") model; ValueError
    naming the file and what it holds otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    ckpt = load_pt(path, "checkpoint", map_location=device, mmap=mmap)
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in ("ar", "nar"):
        raise ValueError(f"{path} is not a model checkpoint (train_codec_lm.py and speechalign.py "
                         "write those)")
    if ckpt["kind"] != kind:
        raise ValueError(f"{path} holds an {ckpt['kind'].upper()} model, not an {kind.upper()}")
    return ckpt


def load_model(path, kind, device="cpu"):
    """Rebuild an AR or NAR from a checkpoint written by train_codec_lm.py; returns (model,
    tokenizer, ckpt)."""
    ckpt = read_checkpoint(path, kind, device)
    cfg = LMConfig(**ckpt["config"])
    model = (AR if kind == "ar" else NAR)(cfg).to(device)
    model.load_state_dict(ckpt["model"])
    tok = TextTokenizer(ckpt["tokenizer"]["symbols"], ckpt["tokenizer"]["kind"])
    return model.eval(), tok, ckpt


# =================================================================================================
# Part 2, SpeechAlign (the paper's section 3), in its order:
#   3.1 the distribution gap: the NAR learnt from golden layer-1 codes but reads the AR's samples;
#   3.2 preference data without human labels: chosen y_w = the golden codes, rejected y_l = the AR's
#       own sample for the same x = (text, prompt);
#   3.3 preference optimisation of the AR with DPO against a frozen copy of itself (the NAR stays
#       fixed);
#   3.4 iterative self-improvement: AR_{t+1} samples the next round's pairs and is its reference.
# Plus the paper's control: continued supervised training on the same golden codes at equal budget.

@dataclass
class AlignArgs:
    init: str = field(default="data/toy/sft_ar.pt", metadata={
        "help": "pretrained AR checkpoint: AR_1 (train_codec_lm.py)"})
    train: str = field(default="data/toy/train_subset.pt", metadata={
        "help": "tokenised corpus the pairs come from"})
    out: str = field(default="runs/toy/align", metadata={
        "help": "run folder: one round{t}/ folder per round"})
    rounds: int = field(default=3, metadata={"help": "rounds of sampling + DPO (the paper ran 3)"})
    control: bool = field(default=False, metadata={
        "help": "the paper's control: continued SFT on the golden codes, same steps and examples "
                "per step, no sampling"})
    n_utts: int = field(default=300, metadata={
        "help": "training utterances x per round (the first n of --train)"})
    fresh_utts: bool = field(default=True, metadata={
        "help": "round t takes the t-th block of n_utts utterances of --train (--no-fresh_utts: "
                "the same first n_utts each round)"})
    k: int = field(default=2, metadata={"help": "rejected samples per utterance"})
    prompt_seconds: float = field(default=3.0, metadata={
        "help": "cross-sentence acoustic prompt length"})
    temperature: float = field(default=1.0, metadata={
        "help": "sampling of rejected codes. Above inference's (SAMPLING), chosen on dev: at 0.5 the "
                "samples are more likely than the golden codes, and DPO pushing them down made WER "
                "worse (data/README.md)"})
    top_k: int = field(default=SAMPLING["top_k"], metadata={
        "help": "sampling of rejected codes (0: no top-k)"})
    seconds_per_token: float = field(default=SAMPLING["seconds_per_token"], metadata={
        "help": "sample length limit, seconds of audio per text token (frame_limit)"})
    beta: float = field(default=0.1, metadata={
        "help": "DPO beta: strength of the pull towards the reference"})
    label_smoothing: float = field(default=0.0, metadata={"help": "conservative DPO epsilon"})
    loss_type: str = field(default="sigmoid", metadata={"help": "sigmoid (DPO) or ipo"})
    sft_weight: float = field(default=0.0, metadata={
        "help": "alpha: weight of an SFT term on the chosen side"})
    lr: float = field(default=2e-5, metadata={
        "help": "AdamW learning rate of the DPO rounds (after a linear warmup)"})
    control_lr: float = field(default=5e-5, metadata={
        "help": "AdamW learning rate of the control, chosen on dev by itself so that DPO is not "
                "compared with an untuned baseline (data/README.md)"})
    lr_decay: float = field(default=0.5, metadata={
        "help": "round t trains at (control_)lr * lr_decay^(t-1) (at 1.0, rounds 2-3 "
                "over-optimised the toy model; data/README.md)"})
    warmup: int = field(default=10, metadata={"help": "warmup steps"})
    steps: int = field(default=40, metadata={"help": "optimizer steps per round"})
    batch_size: int = field(default=16, metadata={
        "help": "pairs per step (control: golden utterances per step)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    sample_batch: int = field(default=64, metadata={
        "help": "sequences per KV-cache sampling batch"})
    reward_pairs: int = field(default=64, metadata={
        "help": "the round's first usable pairs whose rewards metrics.json reports before and "
                "after training, a diagnostic (0: all; two passes over all 600 pairs cost a fifth "
                "of a round)"})
    precision: str = field(default="fp32", metadata={
        "help": "fp32 or bf16 (autocast; log-probs stay fp32)"})
    threads: int = field(default=2, metadata={"help": "CPU threads"})
    seed: int = field(default=0, metadata={"help": "seeds prompts, sampling and batch order"})


# ================================ ALGO LOGIC: SpeechAlign ========================================
# pairs (3.2) -> reference log-probs -> dpo_loss -> dpo_step -> train_round -> align (3.4).

# -------------------------------------------------------------------------------------------------
# 3.2 Pairs. One pairs file per round holds, for every training utterance i, x_i = (text ids, prompt
# layer-1 codes) and the golden y_w,i, and K samples y_l from the round's AR; a pair is (i, one
# sample). Lists of tensors and plain values, so torch.load(weights_only=True) reads it.

def golden_examples(pairs, utts):
    """AR examples (text, prompt [1, Lp], golden codes [1, L]) of utterances `utts`."""
    return [(pairs["texts"][i], pairs["prompts"][i], pairs["chosen"][i].view(1, -1)) for i in utts]


def pair_examples(pairs, idx, side):
    """AR examples of pairs `idx`: their utterance's x with the chosen (golden) or the rejected
    codes."""
    utts = [pairs["pair_utt"][j] for j in idx]
    if side == "chosen":
        return golden_examples(pairs, utts)
    return [(pairs["texts"][i], pairs["prompts"][i], pairs["rejected"][j].view(1, -1))
            for i, j in zip(utts, idx)]


def sampling_batches(lengths, batch_size, seed, device):
    """[(indices, generator)]: items of similar length share a KV-cache sampling batch (less left
    padding), and each batch has its own seeded generator, so what is sampled depends on the seed,
    the lengths and the batch size only (and on the device: a GPU draws other numbers). Pairs and
    evaluation both use it."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)  # stable: ties keep their order
    return [(order[s:s + batch_size],
             torch.Generator(device=device).manual_seed(seed * 1_000_003 + n))
            for n, s in enumerate(range(0, len(order), batch_size))]


@torch.no_grad()
def make_pairs(ar, examples, k=1, sampling=SAMPLING, batch_size=64, seed=0, progress=False, *,
               frame_rate):
    """Sample K rejected layer-1 sequences per example from `ar` (the KV-cache sampler, `sampling`
    settings, the codec's frame_rate); the golden target is the chosen side. Examples that do not
    fit the AR's positions are skipped (too_long) and counted in the statistics. Returns the pairs
    dict with its statistics."""
    ar.eval()
    dev = ar.head.weight.device
    t0 = time.time()
    given = len(examples)
    examples = [ex for ex in examples if too_long(ex, ar.cfg.max_text, ar.cfg.max_audio) is None]
    jobs = [(i, r) for i in range(len(examples)) for r in range(k)]
    lengths = [len(examples[i][0]) + examples[i][1].shape[1] for i, _ in jobs]
    rejected, hit = {}, {}
    for batch, gen in tqdm(sampling_batches(lengths, batch_size, seed, dev), desc="sample pairs",
                           disable=not progress):
        chunk = [jobs[j] for j in batch]
        codes, lim = ar.generate([examples[i][0] for i, _ in chunk],
                                 [examples[i][1] for i, _ in chunk],
                                 generator=gen, frame_rate=frame_rate, **sampling)
        for job, c, h in zip(chunk, codes, lim.tolist()):
            rejected[job], hit[job] = c, h
    order = sorted(rejected)  # (utterance, sample) order, whatever the batching
    pairs = dict(texts=[list(text) for text, _, _ in examples],
                 prompts=[prompt[:1].clone() for _, prompt, _ in examples],
                 chosen=[golden[0].clone() for _, _, golden in examples],
                 rejected=[rejected[job] for job in order], pair_utt=[i for i, _ in order],
                 hit_limit=torch.tensor([hit[job] for job in order]))
    len_c = torch.tensor([len(c) for c in pairs["chosen"]], dtype=torch.float)
    pairs["stats"] = dict(n_utts=len(examples), skipped_too_long=given - len(examples),
                          n_pairs=len(order), k=k, sampling_seconds=round(time.time() - t0, 2),
                          chosen_len_mean=len_c.mean().item())
    if order:  # k = 0 (the control) samples nothing
        len_r = torch.tensor([len(r) for r in pairs["rejected"]], dtype=torch.float)
        pairs["stats"] |= dict(rejected_len_mean=len_r.mean().item(),
                               rejected_len_ratio=(len_r / len_c[pairs["pair_utt"]]).mean().item(),
                               hit_limit_share=pairs["hit_limit"].float().mean().item(),
                               empty_share=(len_r == 0).float().mean().item())
    return pairs


def usable_pairs(pairs):
    """Indices of pairs DPO can learn from: those whose two sides are scored differently. A sample
    equal to the golden codes that ended with EOS is dropped (identical sides give h = 0 and a
    constant loss); an empty one (an immediate EOS) is kept: its EOS, its one scored token, is the
    mistake DPO should push down."""
    sides = zip(pairs["pair_utt"], pairs["rejected"], pairs["hit_limit"].tolist())
    return [j for j, (i, r, cut) in enumerate(sides)
            if cut or not torch.equal(r, pairs["chosen"][i])]


def select_pairs(pairs, idx):
    """The pairs `idx` alone: pair j of the result is pair idx[j] (the utterances stay as they
    are). Training works in this one index space, where pair j is also row j of its reference
    log-probs."""
    return pairs | dict(rejected=[pairs["rejected"][j] for j in idx],
                        pair_utt=[pairs["pair_utt"][j] for j in idx],
                        hit_limit=pairs["hit_limit"][list(idx)])


# -------------------------------------------------------------------------------------------------
# 3.3 Log-probs. Why summed: DPO's objective is about whole sequences, so log pi(y|x) is the sum of
# its tokens' log-probs (Rafailov et al. 2023), not their mean. The sum carries a length bias: when
# the two sides differ in length, h below moves with the extra tokens, and DPO can raise the margin
# by changing lengths alone. Here both sides say the same text and are of similar length; where
# they differ most (a sample that ran to the length limit), the extra length is the mistake.

def ar_logps(model, examples, device="cpu", eos=None):
    """log pi(y | x) of each AR example, summed over its target codes and EOS (text and prompt
    positions are never scored; `eos` as AR.batch takes it), and the number of scored tokens. One
    forward for the whole list."""
    b = model.batch(examples, device=device, eos=eos)
    mask = b["targets"] != -100
    return sequence_logps(model(**b), b["targets"], mask), mask.sum(-1)


def pair_eos(pairs, idx, side):
    """Whether each example of pair_examples(pairs, idx, side) is scored with its EOS: the golden
    codes are, and so is every sample except one cut at the length limit (hit_limit). That one never
    emitted EOS, and scoring one would have DPO push down stopping exactly where the run-away sample
    was cut."""
    return [side == "chosen" or not pairs["hit_limit"][j] for j in idx]


def pair_logps(model, pairs, idx, device="cpu"):
    """The forward DPO trains on: both sides of pairs `idx` in one concatenated batch, chosen then
    rejected. Returns (chosen, rejected) log-probs and (chosen, rejected) scored-token counts."""
    examples = pair_examples(pairs, idx, "chosen") + pair_examples(pairs, idx, "rejected")
    eos = pair_eos(pairs, idx, "chosen") + pair_eos(pairs, idx, "rejected")
    logps, n = ar_logps(model, examples, device, eos)
    return logps.split(len(idx)), n.split(len(idx))


@torch.no_grad()
def reference_logps(reference, pairs, idx, batch_size=32, device="cpu", desc=None):
    """The frozen reference's log-probs of both sides of pairs `idx` (row r: pair idx[r]), computed
    once per round: the reference never changes within a round, so there is nothing to gain from
    running it at every step."""
    reference.eval()
    out = {"chosen": [], "rejected": []}
    for s in tqdm(range(0, len(idx), batch_size), desc=desc, disable=desc is None):
        chunk = idx[s:s + batch_size]
        for side in out:
            ex, eos = pair_examples(pairs, chunk, side), pair_eos(pairs, chunk, side)
            out[side].append(ar_logps(reference, ex, device, eos)[0].cpu())
    return {side: torch.cat(v) for side, v in out.items()}


# -------------------------------------------------------------------------------------------------
# 3.3 The loss. With h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]:
#   DPO (Rafailov et al. 2023, eq. 7):   L = -log sigma(beta h)
#   conservative DPO (Mitchell 2023):     L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)
#                                         (label_smoothing eps: each label is wrong with prob. eps)
#   IPO (Azar et al. 2023):               L = (h - 1 / (2 beta))^2
#     on per-token mean log-probs (as TRL computes it): with sums, the fixed target 1 / (2 beta)
#     would be lost beside an h over hundreds of tokens.
# Implicit rewards r = beta (log pi - log pi_ref), detached: they are logged, never trained on.

def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta=0.1, label_smoothing=0.0, loss_type="sigmoid"):
    """Per-example losses and rewards (each [B]) from the four sequence log-probs; fp32, log-sigmoid
    form."""
    pc, pr, rc, rr = (x.float() for x in (policy_chosen_logps, policy_rejected_logps,
                                          reference_chosen_logps, reference_rejected_logps))
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * h)
                  - label_smoothing * F.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use 'sigmoid' or 'ipo'")
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


# -------------------------------------------------------------------------------------------------
# 3.3 One step, one round. Dropout is off throughout (policy.eval()): with it on, pi != pi_ref at
# step 0 and the rewards start as noise.

def dpo_step(policy, opt, pairs, batch, ref, a):
    """One optimizer step of DPO on pairs `batch` (rows of pairs and of ref); returns what to log.
    Loss: the mean over the batch of dpo_loss, plus a.sft_weight (alpha, default 0) times the chosen
    side's per-token NLL, -log pi(y_w|x) / |y_w| (Pang et al. 2024, iterative RPO): it keeps
    log pi(y_w|x) from falling while the margin grows."""
    dev = policy.head.weight.device
    with autocast(a.precision, dev):
        (logp_c, logp_r), (n_c, n_r) = pair_logps(policy, pairs, batch, dev)  # one forward
        pc, pr = logp_c, logp_r
        rc, rr = ref["chosen"][batch].to(dev), ref["rejected"][batch].to(dev)
        if a.loss_type == "ipo":  # IPO works on length-averaged log-probs
            pc, pr, rc, rr = pc / n_c, pr / n_r, rc / n_c, rr / n_r
        losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, a.beta, a.label_smoothing, a.loss_type)
        loss = losses.mean()
        if a.sft_weight:
            loss = loss + a.sft_weight * (-logp_c / n_c).mean()
    rec = {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
           "rewards/accuracies": (r_c > r_r).float().mean().item(),
           "rewards/margins": (r_c - r_r).mean().item(),
           "logps/chosen": logp_c.mean().item(), "logps/rejected": logp_r.mean().item(),
           "lengths/chosen": n_c.float().mean().item(),
           "lengths/rejected": n_r.float().mean().item()}
    return rec | optimizer_step(policy, opt, loss, a.grad_clip)


def sft_step(policy, opt, examples, a):
    """The control's step: the mean per-token NLL of the golden codes (lm_loss)."""
    dev = policy.head.weight.device
    with autocast(a.precision, dev):
        loss = lm_loss(policy, policy.batch(examples, device=dev))
    return optimizer_step(policy, opt, loss, a.grad_clip)


def optimizer_step(model, opt, loss, grad_clip):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return {"loss": loss.item(), "grad_norm": norm.item()}


def train_round(policy, pairs, idx, ref, a, log=None, before=0, lr=None):
    """One round: a.steps optimizer steps (dpo_step) of a.batch_size of the pairs `idx`, whose
    reference log-probs `ref` are in idx's order; with a.control, sft_step on the golden codes of
    the utterances `idx`. lr: the round's learning rate (default a.lr), after a.warmup linear
    warmup steps. Batches are drawn in epochs over idx, each in a fresh order.

    With `before` = n, it first takes the policy's log-probs of the first n pairs of idx as training
    computes them (this mode, this autocast, the same forward, a.batch_size pairs at a time) and
    returns them: against the reference's, the `before` rewards, near 0 only if training sees the
    policy as the reference was measured."""
    lr = a.lr if lr is None else lr
    policy.eval()
    if a.control:
        golden = golden_examples(pairs, idx)
    else:
        pairs = select_pairs(pairs, idx)  # from here on, pair r is row r of ref
    measured = training_logps(policy, select_pairs(pairs, range(before)), a) if before else None
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = torch.Generator().manual_seed(a.seed)
    queue = []
    for step in tqdm(range(1, a.steps + 1), desc="control (SFT)" if a.control else "DPO",
                     disable=log is None):
        while len(queue) < a.batch_size:
            queue += torch.randperm(len(idx), generator=order).tolist()
        batch, queue = queue[:a.batch_size], queue[a.batch_size:]
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / max(1, a.warmup))
        rec = {"step": step, "lr": opt.param_groups[0]["lr"]}
        if a.control:
            rec |= sft_step(policy, opt, [golden[r] for r in batch], a)
        else:
            rec |= dpo_step(policy, opt, pairs, batch, ref, a)
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
    policy.eval()
    return measured


@torch.no_grad()
def training_logps(policy, pairs, a):
    """{side: log-probs} of every pair, from the forward dpo_step trains on (pair_logps), under its
    autocast, a.batch_size pairs at a time."""
    dev = policy.head.weight.device
    chunks = [range(s, min(s + a.batch_size, len(pairs["rejected"])))
              for s in range(0, len(pairs["rejected"]), a.batch_size)]
    with autocast(a.precision, dev):
        logps = [pair_logps(policy, pairs, list(chunk), dev)[0] for chunk in chunks]
    return {side: torch.cat([lp[k] for lp in logps]).cpu()
            for k, side in enumerate(("chosen", "rejected"))}


def reward_metrics(now, ref, beta):
    """Mean rewards, margin and accuracy of log-probs `now` against the reference's."""
    _, r_c, r_r = dpo_loss(now["chosen"], now["rejected"], ref["chosen"], ref["rejected"], beta)
    return {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
            "rewards/margins": (r_c - r_r).mean().item(),
            "rewards/accuracies": (r_c > r_r).float().mean().item(),
            "logps/chosen": now["chosen"].mean().item(),
            "logps/rejected": now["rejected"].mean().item()}


# -------------------------------------------------------------------------------------------------
# 3.4 The iterative loop. Round t: AR_t (the SFT model for t = 1) samples fresh pairs, is the frozen
# reference (its log-probs, precomputed) and is trained into AR_{t+1} = OUT/round{t}/ar.pt, saved
# with the round's pairs.pt, log.jsonl and metrics.json. A round whose ar.pt and metrics.json exist
# is done and not redone (finished_round); an interrupted one keeps its pairs (round_pairs).

def align(a):
    """Run the rounds (DPO, or the control); returns the list of per-round metrics."""
    torch.set_num_threads(a.threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    policy, tok, ckpt, corpus, pool = load_inputs(a, dev)
    history = []
    for t in range(1, a.rounds + 1):
        folder = os.path.join(a.out, f"round{t}")
        if done := finished_round(folder, t, a, dev):
            policy, metrics = done  # AR_{t+1}: the next round's policy
            history.append(metrics)
            continue
        first = (t - 1) * a.n_utts if a.fresh_utts else 0
        pairs = round_pairs(policy, pool[first:first + a.n_utts], t, first, folder, a, tok, corpus)
        if a.control:  # every utterance's golden codes
            idx, ref = list(range(len(pairs["chosen"]))), None
        else:
            idx = usable_pairs(pairs)
            if not idx:
                raise ValueError(f"round {t}: none of the {len(pairs['rejected'])} sampled pairs "
                                 f"is usable (every sample equals its golden codes); nothing for "
                                 f"DPO to learn from")
            # pi_ref = AR_t, the policy before this round's first step; only its log-probs are
            # needed, so they are kept and nothing of the model.
            with autocast(a.precision, dev):
                ref = reference_logps(policy, pairs, idx, a.batch_size, dev,
                                      desc="reference log-probs")
            pairs["reference"] = ref | {"idx": torch.tensor(idx)}
        save_checkpoint(os.path.join(folder, "pairs.pt"), **pairs)
        lr = (a.control_lr if a.control else a.lr) * a.lr_decay ** (t - 1)  # lower in later rounds
        shown = 0 if a.control else len(idx[:a.reward_pairs or None])  # pairs the rewards are of
        t0 = time.time()
        with open(os.path.join(folder, "log.jsonl"), "w") as log:
            # `before`: the policy as training sees it before its first step, where pi = pi_ref:
            # rewards near 0 (not exactly: batches padded to other lengths round differently, by up
            # to ~0.2 nats in bf16)
            before = train_round(policy, pairs, idx, ref, a, log, before=shown, lr=lr)
        metrics = dict(round=t, control=a.control, pairs=pairs["stats"], usable_pairs=len(idx),
                       train_seconds=round(time.time() - t0, 1), args=asdict(a))
        if not a.control:
            with autocast(a.precision, dev):
                after = reference_logps(policy, pairs, idx[:shown], a.batch_size, dev,
                                        desc="rewards after")
            ref_shown = {side: ref[side][:shown] for side in ("chosen", "rejected")}
            metrics |= {"before": reward_metrics(before, ref_shown, a.beta),
                        "after": reward_metrics(after, ref_shown, a.beta), "reward_pairs": shown}
        save_round(folder, policy, tok, ckpt, a, metrics)
        history.append(metrics)
    return history

# ================================ end of ALGO LOGIC ==============================================


def load_inputs(a, dev):
    """AR_1, its tokenizer and checkpoint, the corpus and its examples (pool), checked to fit."""
    corpus = load_corpus(a.train)
    policy, tok, ckpt = load_model(a.init, "ar", dev)
    if ckpt["codec"]["name"] != corpus["codec"]["name"]:
        raise ValueError(f"{a.init} was trained on codec {ckpt['codec']['name']}, but {a.train} is "
                         f"tokenised with {corpus['codec']['name']}")
    pool = make_examples(corpus, tok, a.prompt_seconds, seed=a.seed,
                         frame_rate=corpus["codec"]["frame_rate"])
    blocks = a.rounds if a.fresh_utts else 1
    if len(pool) < a.n_utts * blocks:
        raise ValueError(f"{a.train} has {len(pool)} utterances; {blocks} x --n_utts {a.n_utts} "
                         f"needs {a.n_utts * blocks}")
    return policy, tok, ckpt, corpus, pool


def finished_round(folder, t, a, dev):
    """(AR_{t+1}, metrics) of a round an earlier run finished, or None. One made with other settings
    is refused."""
    out_ckpt, metrics_path = os.path.join(folder, "ar.pt"), os.path.join(folder, "metrics.json")
    if not (os.path.exists(out_ckpt) and os.path.exists(metrics_path)):
        return None
    policy, _, done = load_model(out_ckpt, "ar", dev)
    # settings the round's weights do not depend on (a DPO run's control_lr, the control's lr)
    unused = ("rounds", "threads", "sample_batch", "reward_pairs",
              "lr" if a.control else "control_lr")
    check_same("round checkpoint", out_ckpt, done["args"],
               {k: v for k, v in asdict(a).items() if k not in unused})
    with open(metrics_path) as f:
        metrics = json.load(f)
    print(f"round {t}: done before, loaded {out_ckpt}")
    return policy, metrics


def round_pairs(policy, examples, t, first, folder, a, tok, corpus):
    """Round t's pairs for `examples` (pool[first:]): sampled from the policy, or the pairs file of
    an interrupted run of this round, refused if it was made with other settings."""
    sampling = dict(temperature=a.temperature, top_k=a.top_k or None, top_p=None,
                    seconds_per_token=a.seconds_per_token)
    meta = dict(codec=corpus["codec"]["name"], config=asdict(policy.cfg), tokenizer=tok.symbols,
                train=a.train, n_utts=len(examples), k=0 if a.control else a.k, sampling=sampling,
                seed=a.seed, round=t, prompt_seconds=a.prompt_seconds, first_utt=first)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "pairs.pt")
    if os.path.exists(path):  # sampled before this round was interrupted
        pairs = load_pt(path, "pairs", map_location=None)  # the device they were made on
        check_same("pairs", path, pairs["meta"], meta)
    else:
        pairs = make_pairs(policy, examples, meta["k"], sampling, a.sample_batch,
                           seed=a.seed * 1000 + t, progress=True,
                           frame_rate=corpus["codec"]["frame_rate"])
        pairs["meta"] = meta
    if pairs["stats"]["skipped_too_long"]:
        print(f"round {t}: {pairs['stats']['skipped_too_long']} of {len(examples)} utterances "
              f"skipped, longer than the AR's positions ({policy.cfg.max_text} text, "
              f"{policy.cfg.max_audio} audio frames)")
    if not pairs["chosen"]:
        raise ValueError(f"round {t}: none of the {len(examples)} utterances fits the AR's "
                         f"positions")
    return pairs


def save_round(folder, policy, tok, ckpt, a, metrics):
    """AR_{t+1} and the round's metrics.json (written last: with it the round is done)."""
    save_checkpoint(os.path.join(folder, "ar.pt"), kind="ar", config=asdict(policy.cfg),
                    step=ckpt["step"], model=policy.state_dict(),
                    tokenizer={"symbols": tok.symbols, "kind": tok.kind}, codec=ckpt["codec"],
                    round=metrics["round"], args=asdict(a))
    metrics_path = os.path.join(folder, "metrics.json")
    write_text(metrics_path, json.dumps(metrics, indent=1))
    if not a.control:
        m = metrics["after"]
        print(f"round {metrics['round']}: margin {metrics['before']['rewards/margins']:+.3f} -> "
              f"{m['rewards/margins']:+.3f}, accuracy {m['rewards/accuracies']:.3f}, logps chosen "
              f"{m['logps/chosen']:.1f} rejected {m['logps/rejected']:.1f}")


def check_same(what, path, stored, expected):
    """Refuse a file made with other settings, saying which ones differ."""
    diff = {k: (stored.get(k), v) for k, v in expected.items() if stored.get(k) != v}
    if diff:
        lines = "; ".join(f"{k}: file has {s!r}, this run has {e!r}" for k, (s, e) in diff.items())
        raise ValueError(f"{path}: {what} made with other settings ({lines}). Delete it or choose "
                         f"another --out.")


def dataclass_parser(cls, **kw):
    """An argparse parser with one --flag per field of the dataclass `cls`: the field's type and
    default, and its metadata as add_argument's keywords (help, and choices, action, metavar where
    given). A field without a default is a required flag; a bool without an action gets --flag and
    --no-flag; a help gets the default appended."""
    ap = argparse.ArgumentParser(**kw)
    for f in fields(cls):
        opts = dict(f.metadata)
        if f.default is MISSING:
            opts["required"] = True
        else:
            opts["default"] = f.default
            if f.default is not None and f.type is not bool:
                opts["help"] = f"{opts['help']} ({f.default})"
        if f.type is bool:
            opts.setdefault("action", argparse.BooleanOptionalAction)
        else:
            opts["type"] = f.type
        ap.add_argument(f"--{f.name}", **opts)
    return ap


def parse_args(argv=None):
    ap = dataclass_parser(AlignArgs, description="SpeechAlign: iterative DPO of the AR on "
                                                 "golden-vs-synthetic pairs.")
    return AlignArgs(**vars(ap.parse_args(argv)))


if __name__ == "__main__":
    align(parse_args())
