"""SpeechAlign (Zhang et al., NeurIPS 2024) in one file: a codec language model for zero-shot TTS and its
preference alignment.

Part 1, the codec LM (the paper's section 2 and VALL-E):
  - text in: phonemes (or letters) -> integer ids;
  - AR: one causal transformer over [text | prompt layer-1 codes | target layer-1 codes | EOS];
  - NAR: one bidirectional transformer that fills in layers 2..Q of the target, one layer at a time;
  - sequence_logps: the summed log-probability of chosen tokens -- the one quantity that supervised
    training, DPO and evaluation all read;
  - sampling: batched AR generation with a KV cache, greedy NAR decoding, codes -> waveform.

Everything runs on one GPU or the CPU. `train_codec_lm.py` pretrains the two models; `eval.py` judges them.
"""
import math
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------------------------------------
# Text tokenizer. Phonemes are the default: at toy scale design.md's prototype could not learn how letters
# sound in the compute we have. The toy corpus stores espeak-ng phonemes ("D @2 | k w 'I k": phonemes split
# by spaces, words by "|"); for the real setting data/make_manifest.py writes the same format.

PAD = "<pad>"
LETTERS = list("abcdefghijklmnopqrstuvwxyz' ")


class TextTokenizer:
    """Maps a phoneme string (kind="phonemes") or a text (kind="letters") to ids; id 0 is padding.

    The phoneme vocabulary is every symbol of the training corpus, sorted, and it is saved with each
    checkpoint. A symbol outside the vocabulary is an error naming it and the utterance: silently dropping
    a phoneme would teach the model to skip sounds. Letters: the text is lower-cased and runs of spaces
    collapse; any character outside a-z, apostrophe and space is an error.
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
                raise ValueError(f"utterance {utt}: unknown {self.kind[:-1]} symbol {s!r} (not in the "
                                 f"{len(self.symbols)}-symbol vocabulary of this model)")
        return [self.index[s] for s in symbols]


# -----------------------------------------------------------------------------------------------------------
# The transformer. Both models read one sequence per example whose tokens are either text or audio; each
# kind has its own embedding table and its own position table, so position 5 of the text and frame 5 of the
# audio are never confused. Batches are padded; `valid` marks real tokens.

@dataclass
class LMConfig:
    n_text: int  # text vocabulary size (with padding)
    card: tuple  # codebook size of each codec layer
    d_model: int = 256
    n_layer: int = 6
    n_head: int = 4
    dropout: float = 0.1  # residual and MLP dropout; none inside attention (it forces a slow SDPA path)
    max_text: int = 256  # text positions
    max_audio: int = 1024  # audio positions: prompt + target (+ EOS), in frames


class Block(nn.Module):
    """Pre-norm transformer block. `cache`, when given, is a dict that keeps this block's keys and values."""

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
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))  # mask [B, T, T_keys]
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
        self.audio_pos = nn.Embedding(cfg.max_audio, cfg.d_model)
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
        """text [B, T] ids (read where not is_audio); audio [B, q, T] codes (read where is_audio)."""
        if ((pos >= self.cfg.max_text) & ~is_audio).any() or ((pos >= self.cfg.max_audio) & is_audio).any():
            raise ValueError(f"sequence longer than the model's positions ({self.cfg.max_text} text, "
                             f"{self.cfg.max_audio} audio)")
        # sum the embeddings of the layers given; a code of -1 means "this layer is not given here"
        a = sum(emb(audio[:, q].clamp(min=0)) * (audio[:, q] >= 0).unsqueeze(-1)
                for q, emb in enumerate(self.audio_emb[: audio.shape[1]]))
        x_text = self.text_emb(text.clamp(min=0)) + self.text_pos(pos.clamp(max=self.cfg.max_text - 1))
        x_audio = a + self.audio_pos(pos)
        return self.drop(torch.where(is_audio.unsqueeze(-1), x_audio, x_text))

    def trunk(self, x, mask, caches=None):
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None if caches is None else caches[i])
        return self.ln_f(x)


def attention_mask(valid, causal):
    """[B, T, T] boolean: query t may attend key s if s is a real token (and s <= t when causal).

    Every position may attend itself, so a padding row never has all its keys masked (that gives NaN,
    and 0 * NaN in the next layer's attention would leak it into real rows)."""
    T = valid.shape[1]
    mask = valid.unsqueeze(1).expand(-1, T, -1)
    if causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    return mask | torch.eye(T, dtype=torch.bool, device=valid.device)


# -----------------------------------------------------------------------------------------------------------
# Examples and acoustic prompts. An example is (text ids, prompt codes [Q, Lp], target codes [Q, Lg]).
# The prompt is, as in VALL-E's evaluation, about 3 s of *another* utterance of the same speaker
# ("cross-sentence"); "continuation" mode instead uses the first seconds of the utterance itself and makes
# the rest the target.

def make_examples(corpus, tok, prompt_seconds=3.0, mode="cross", seed=0, frame_rate=50):
    if mode not in ("cross", "continuation"):
        raise ValueError(f"unknown prompt mode {mode!r}: use 'cross' or 'continuation'")
    rng = random.Random(seed)
    n_prompt = int(prompt_seconds * frame_rate)
    by_spk = {}
    for i, spk in enumerate(corpus["speakers"]):
        by_spk.setdefault(spk, []).append(i)
    texts = corpus["phonemes"] if tok.kind == "phonemes" else corpus["texts"]
    examples = []
    for i, codes in enumerate(corpus["utts"]):
        text = tok.encode(texts[i], corpus["ids"][i])
        if mode == "continuation":
            if codes.shape[1] <= n_prompt:
                continue  # nothing left to continue
            examples.append((text, codes[:, :n_prompt], codes[:, n_prompt:]))
            continue
        others = [j for j in by_spk[corpus["speakers"][i]] if j != i]
        if not others:
            raise ValueError(f"utterance {corpus['ids'][i]}: its speaker has no other utterance to prompt with")
        j = rng.choice(others)
        examples.append((text, corpus["utts"][j][:, :n_prompt], codes))
    return examples


# -----------------------------------------------------------------------------------------------------------
# sequence_logps: log p(y | x) = sum over scored positions t of log softmax(logits_t)[y_t].
# Computed in fp32 (bf16/fp16 log-softmax loses the small differences DPO lives on). Targets at unscored
# positions may hold anything (-100, padding); they are replaced before indexing, never used as indices.

def sequence_logps(logits, targets, mask):
    logp = logits.float().log_softmax(-1)
    picked = logp.gather(-1, torch.where(mask, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, 0.0).sum(-1)


def lm_loss(model, b):
    """Supervised loss of an AR or NAR batch: mean cross-entropy per scored token (targets != -100).
    `model` may be wrapped (DistributedDataParallel): the forward goes through the wrapper."""
    mask = b["targets"] != -100
    return -sequence_logps(model(**b), b["targets"], mask).sum() / mask.sum()


def pack(examples, n_layers):
    """The right-padded layout AR and NAR batches share: per example [text | prompt | target], text ids and
    positions filled in, audio codes all -1 (absent) for the caller to fill, targets all -100 (unscored).
    Returns the tensors and each example's (text, prompt, target) lengths."""
    spans = [(len(t), p.shape[1], g.shape[1]) for t, p, g in examples]
    B, T = len(examples), max(map(sum, spans))
    b = dict(text=torch.zeros(B, T, dtype=torch.long), audio=torch.full((B, n_layers, T), -1, dtype=torch.long),
             is_audio=torch.zeros(B, T, dtype=torch.bool), pos=torch.zeros(B, T, dtype=torch.long),
             valid=torch.zeros(B, T, dtype=torch.bool), targets=torch.full((B, T), -100, dtype=torch.long))
    for i, ((t, _, _), (lt, lp, lg)) in enumerate(zip(examples, spans)):
        b["text"][i, :lt] = torch.tensor(t)
        b["is_audio"][i, lt:lt + lp + lg] = True
        b["pos"][i, :lt] = torch.arange(lt)
        b["pos"][i, lt:lt + lp + lg] = torch.arange(lp + lg)
        b["valid"][i, :lt + lp + lg] = True
    return b, spans


# -----------------------------------------------------------------------------------------------------------
# AR: p(c_1 | text, prompt) = prod_t p(c_1[t] | text, prompt layer 1, c_1[<t]), then EOS.

class AR(CodecLM):
    def __init__(self, cfg):
        super().__init__(cfg, n_audio_in=[cfg.card[0] + 1])
        self.eos = cfg.card[0]
        self.head = nn.Linear(cfg.d_model, cfg.card[0] + 1, bias=False)

    def batch(self, examples, device="cpu"):
        """Right-padded [text | prompt | target] sequences; `targets` are the next audio token (or EOS) at the
        positions that predict the target and EOS, -100 elsewhere, so text and prompt are never scored."""
        b, spans = pack(examples, n_layers=1)
        for i, ((_, p, g), (lt, lp, lg)) in enumerate(zip(examples, spans)):
            b["audio"][i, 0, lt:lt + lp + lg] = torch.cat([p[0], g[0]])
            start = lt + lp - 1  # the last prompt token predicts the first target code
            b["targets"][i, start:start + lg + 1] = torch.cat([g[0], torch.tensor([self.eos])])
        return {k: v.to(device) for k, v in b.items()}

    def forward(self, text, audio, is_audio, pos, valid, caches=None, mask=None, **_):
        x = self.embed(text, audio, is_audio, pos)
        return self.head(self.trunk(x, attention_mask(valid, causal=True) if mask is None else mask, caches))

    @torch.no_grad()
    def generate(self, texts, prompts, temperature=1.0, top_k=None, top_p=None, max_ratio=8.0,
                 use_cache=True, generator=None, return_logits=False):
        """Sample layer-1 codes for each (text ids, prompt codes [Q, Lp]); batched, with a KV cache.

        Prefixes [text | prompt] are left-padded so that every sequence's next token lands in the same
        column. Each sequence stops at its own EOS or after max_ratio * len(text) frames (then `hit_limit`).
        temperature 0 is greedy. Returns (list of LongTensor [T_i], hit_limit BoolTensor [B]).
        """
        dev = self.head.weight.device
        B = len(texts)
        lt = torch.tensor([len(t) for t in texts])
        lp = torch.tensor([p.shape[1] for p in prompts])
        P = int((lt + lp).max())
        limit = torch.minimum((max_ratio * lt).ceil().long(), self.cfg.max_audio - lp)
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
            pos[i, P - lp[i]:] = torch.arange(lp[i])
            valid[i, s:] = True
        text, audio, is_audio, pos, valid = (x.to(dev) for x in (text, audio, is_audio, pos, valid))
        lp, limit = lp.to(dev), limit.to(dev)
        caches = [dict() for _ in self.blocks] if use_cache else None
        out = torch.zeros(B, 0, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        hit_limit = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)
        step_logits = []
        feed = (text, audio, is_audio, pos)
        mask = attention_mask(valid, causal=True)
        for step in range(int(limit.max())):
            logits = self(*feed, valid, caches=caches, mask=mask)[:, -1].float()
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
            # the next input column: the sampled code at audio position lp + step
            new = (torch.zeros(B, 1, dtype=torch.long, device=dev), out[:, -1:].unsqueeze(1),
                   torch.ones(B, 1, dtype=torch.bool, device=dev), (lp + step).unsqueeze(1))
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)
            if use_cache:
                feed, mask = new, valid.unsqueeze(1)  # one query row that sees every real key so far
            else:
                feed = tuple(torch.cat([a, b], -1) for a, b in zip(feed, new))
                mask = attention_mask(valid, causal=True)
        codes = [out[i, :lengths[i]].cpu() for i in range(B)]
        return (codes, hit_limit.cpu(), step_logits) if return_logits else (codes, hit_limit.cpu())


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits [B, V]: temperature, then top-k, then nucleus (top-p) filtering."""
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


# -----------------------------------------------------------------------------------------------------------
# NAR: p(c_j | text, prompt, c_<j) = prod_t p(c_j[t] | ...), for j = 2..Q, all frames at once.
# Input frames are sums of layer embeddings: all Q layers for the prompt, layers < j for the target; an
# embedding of j is added everywhere so that one network serves every layer; one output head per layer.

class NAR(CodecLM):
    def __init__(self, cfg):
        super().__init__(cfg, n_audio_in=list(cfg.card))
        self.layer_emb = nn.Embedding(len(cfg.card), cfg.d_model)
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, n, bias=False) for n in cfg.card[1:])

    def batch(self, examples, j, device="cpu"):
        """Sequences [text | prompt (all layers) | target (layers < j)] for predicting layer j (0-based,
        1..Q-1); `targets` hold layer j's codes at the target frames and -100 elsewhere."""
        b, spans = pack(examples, n_layers=len(self.cfg.card))
        for i, ((_, p, g), (lt, lp, lg)) in enumerate(zip(examples, spans)):
            b["audio"][i, :, lt:lt + lp] = p
            b["audio"][i, :j, lt + lp:lt + lp + lg] = g[:j]
            if g.shape[0] > j:  # training: the answer is known
                b["targets"][i, lt + lp:lt + lp + lg] = g[j]
        return {k: v.to(device) for k, v in b.items()} | {"j": j}

    def forward(self, text, audio, is_audio, pos, valid, j, **_):
        x = self.embed(text, audio, is_audio, pos) + self.layer_emb.weight[j]
        return self.heads[j - 1](self.trunk(x, attention_mask(valid, causal=False)))

    @torch.no_grad()
    def generate(self, texts, prompts, layer1):
        """Greedy layers 2..Q for each (text, prompt [Q, Lp], layer-1 codes [T]) -> list of codes [Q, T]."""
        dev = self.layer_emb.weight.device
        codes = [c.view(1, -1).to(dev) for c in layer1]
        for j in range(1, len(self.cfg.card)):
            b = self.batch([(t, p, c) for t, p, c in zip(texts, prompts, codes)], j, device=dev)
            pred = self(**b).argmax(-1)
            codes = [torch.cat([c, pred[i, len(t) + p.shape[1]:len(t) + p.shape[1] + c.shape[1]].unsqueeze(0)])
                     for i, (t, p, c) in enumerate(zip(texts, prompts, codes))]
        return [c.cpu() for c in codes]


# -----------------------------------------------------------------------------------------------------------
# From (text, prompt) to a waveform: AR samples layer 1, NAR fills in 2..Q, the codec decodes.

@torch.no_grad()
def synthesise(ar, nar, texts, prompts, codec=None, **sampling):
    """Returns (codes [Q, T_i] per example, hit_limit [B]) and, if a codec is given, the waveforms too."""
    layer1, hit_limit = ar.generate(texts, prompts, **sampling)
    layer1 = [c if len(c) else torch.zeros(1, dtype=torch.long) for c in layer1]  # an immediate EOS: 1 frame
    codes = nar.generate(texts, prompts, layer1)
    if codec is None:
        return codes, hit_limit
    return codes, hit_limit, [codec.decode(c)[0] for c in codes]


# -----------------------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and numbers, written atomically, read with weights_only=True.

def save_checkpoint(path, **state):
    import os
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_model(path, kind, device="cpu"):
    """Rebuild an AR or NAR from a checkpoint written by train_codec_lm.py; returns (model, tokenizer, ckpt)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt.get("kind") != kind:
        raise ValueError(f"{path} holds a {ckpt.get('kind')} model, not an {kind}")
    cfg = LMConfig(**ckpt["config"])
    model = (AR if kind == "ar" else NAR)(cfg).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), TextTokenizer(ckpt["tokenizer"]["symbols"], ckpt["tokenizer"]["kind"]), ckpt
