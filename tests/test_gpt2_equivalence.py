"""Our AR's transformer against a trusted one, as minGPT checks itself against Hugging Face's GPT-2:
a GPT-2 of the same size, its weights copied into our blocks, must give the same hidden states after
every block and after the final norm, in float64, on the same input embeddings -- over a right-padded
batch in one forward, and step by step through our KV cache (AR.generate) against GPT-2's
past_key_values. GPT-2 runs its eager attention, a hand-written softmax(q k^T / sqrt(d)) v under its
own causal mask, where ours calls SDPA. Skipped without transformers, which CI does not install
(pip install -r bench/requirements.txt)."""
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
from bench.bench import gpt2  # noqa: E402  the benchmarks' same-size peer: exact GELU, LayerNorm eps 1e-5
from speechalign import AR, LMConfig  # noqa: E402

CFG = LMConfig(n_text=10, card=(64,), d_model=32, n_layer=3, n_head=4)  # dropout 0.1: eval() turns it off
TOL = 1e-12  # float64 agrees to ~3e-15; a tanh GELU is ~2e-4 off, a LayerNorm eps of 1e-6 ~1e-2


def twins():
    """Our AR and a GPT-2 with the same transformer weights, both float64 and in eval mode. Returns each
    one's modules whose outputs are compared: its blocks, then its final norm."""
    torch.manual_seed(0)
    ar = AR(CFG).double().eval()
    peer = gpt2(SimpleNamespace(card=CFG.card[0], d_model=CFG.d_model, n_layer=CFG.n_layer,
                                n_head=CFG.n_head, dropout=CFG.dropout, device=torch.device("cpu")),
                n_positions=CFG.max_text + CFG.max_audio)
    peer.set_attn_implementation("eager")
    peer = peer.double().eval()
    gpt = peer.transformer
    with torch.no_grad():
        # GPT-2 starts with zero biases and identity norms: perturb every weight so a wrong copy shows
        for p in peer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        gpt.wpe.weight.zero_()  # GPT-2 reads our embeddings, which already hold our position tables
        for ours, theirs in zip(ar.blocks, gpt.h):
            ours.ln1.load_state_dict(theirs.ln_1.state_dict())
            ours.ln2.load_state_dict(theirs.ln_2.state_dict())
            # Conv1D keeps its weight as [in, out], nn.Linear as [out, in]; c_attn's outputs are laid
            # out as ours are: [q | k | v], each split into heads the same way
            for lin, conv in [(ours.qkv, theirs.attn.c_attn), (ours.proj, theirs.attn.c_proj),
                              (ours.mlp[0], theirs.mlp.c_fc), (ours.mlp[2], theirs.mlp.c_proj)]:
                lin.weight.copy_(conv.weight.T)
                lin.bias.copy_(conv.bias)
        ar.ln_f.load_state_dict(gpt.ln_f.state_dict())
    return ar, [*ar.blocks, ar.ln_f], peer, [*gpt.h, gpt.ln_f]


def layers(call, modules):
    """Runs call(); returns its result and the outputs of `modules` in the order they ran, stacked per
    forward: a list of [n_layer + 1, B, T, C], one per forward call() made."""
    outs = []
    hooks = [m.register_forward_hook(lambda m, i, y: outs.append(y)) for m in modules]
    try:
        result = call()
    finally:
        for h in hooks:
            h.remove()
    return result, [torch.stack(outs[s:s + len(modules)]) for s in range(0, len(outs), len(modules))]


def examples(lengths, g):
    """AR examples (text ids, prompt [1, lp], target [1, lg]) of the given (lt, lp, lg)."""
    return [(torch.randint(1, CFG.n_text, (lt,), generator=g).tolist(),
             torch.randint(0, CFG.card[0], (1, lp), generator=g),
             torch.randint(0, CFG.card[0], (1, lg), generator=g)) for lt, lp, lg in lengths]


def embed(ar, b):
    return ar.embed(b["text"], b["audio"], b["is_audio"], b["pos"])


def test_forward_matches_gpt2_after_every_layer():
    """A right-padded training batch through AR.forward (causal attention alone, no mask) against each
    row alone, unpadded, through GPT-2."""
    ar, ar_layers, peer, peer_layers = twins()
    b = ar.batch(examples([(5, 4, 9), (3, 6, 2), (7, 5, 6)], torch.Generator().manual_seed(1)))
    with torch.no_grad():
        x = embed(ar, b)
        _, [ours] = layers(lambda: ar(**b), ar_layers)
        for i, n in enumerate(b["valid"].sum(1).tolist()):
            _, [theirs] = layers(lambda: peer(inputs_embeds=x[i:i + 1, :n]), peer_layers)
            diff = (ours[:, i:i + 1, :n] - theirs).abs().amax((1, 2, 3))
            assert diff.max() < TOL, f"row {i}: max |ours - GPT-2| per layer {diff}"


def test_kv_cache_steps_match_gpt2_past_key_values():
    """AR.generate (left-padded prefixes, then one token a step through the blocks' caches) against
    GPT-2 reading each row alone: its prefix, then the same tokens one at a time via past_key_values."""
    ar, ar_layers, peer, peer_layers = twins()
    g = torch.Generator().manual_seed(2)
    texts, prompts, _ = zip(*examples([(4, 5, 0), (2, 3, 0), (6, 2, 0)], g))
    with torch.no_grad():
        (codes, hit_limit), ours = layers(
            lambda: ar.generate(texts, prompts, temperature=0, seconds_per_token=0.04, frame_rate=50), ar_layers)
        P = ours[0].shape[2]  # step 0 reads the left-padded prefixes, each later step one column
        for i, (t, p) in enumerate(zip(texts, prompts)):
            x = embed(ar, ar.batch([(t, p, codes[i].view(1, -1))]))  # [text | prompt | codes], unpadded
            n, cache = len(t) + p.shape[1], None
            # the steps row i took: one per code, and one more for its EOS unless it hit the limit
            for s in range(len(codes[i]) + int(not hit_limit[i])):
                feed = x[:, :n] if s == 0 else x[:, n + s - 1:n + s]  # the code of step s - 1
                out, [theirs] = layers(
                    lambda: peer(inputs_embeds=feed, past_key_values=cache, use_cache=True), peer_layers)
                cache = out.past_key_values
                mine = ours[s][:, i:i + 1, P - n:] if s == 0 else ours[s][:, i:i + 1]
                diff = (mine - theirs).abs().amax((1, 2, 3))
                assert diff.max() < TOL, f"row {i}, step {s}: max |ours - GPT-2| per layer {diff}"
    assert min(map(len, codes)) >= 3  # several cached steps per row (a greedy EOS could cut one short)
