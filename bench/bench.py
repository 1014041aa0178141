"""Throughput of the codec LM against the tools people would otherwise use.

    python bench/bench.py sampling  # AR sampling: our KV-cache sampler, our no-cache path, transformers' generate
    python bench/bench.py train     # AR training step against the same-size transformers GPT-2
    python bench/bench.py dpo       # DPO step: precomputed reference log-probs against a live reference forward
    python bench/bench.py mfu       # CUDA: MFU of AR pretraining, 12 layers x 768, EnCodec vocabulary, 75 Hz, bf16

Each prints a table and writes JSON (--out; default bench/results/<name>.json). Every figure is the median of
--runs timed runs (5) after --warmup untimed ones. The systems compared run in this one process on the same inputs
and threads (--threads), interleaved run by run in a rotating order, so a change in the machine's load hits them
alike. Defaults are the shipped toy AR (d_model 256, 4 layers, 4 heads, 1024 codes + EOS, 77 text symbols) on 40
text tokens and a 150-frame prompt (3 s at 50 Hz). The peers: pip install -r bench/requirements.txt.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from speechalign import (AR, AlignArgs, LMConfig, ar_logps, autocast, pair_examples, reference_logps,  # noqa: E402
                         train_round)
from train_codec_lm import train_step  # noqa: E402

# bf16 dense peak of the GPUs we know, in TFLOP/s (first match in the device name wins)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


# -----------------------------------------------------------------------------------------------------------
# Timing, memory, output

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(systems, args):
    """{name: fn} -> {name: [seconds of each timed run]}: --warmup untimed runs of each, then --runs rounds in
    which every system runs once, in an order that rotates from round to round."""
    names = list(systems)
    for _ in range(args.warmup):
        for n in names:
            systems[n]()
    times = {n: [] for n in names}
    for r in range(args.runs):
        for n in names[r % len(names):] + names[:r % len(names)]:
            sync(args.device)
            t0 = time.perf_counter()
            systems[n]()
            sync(args.device)
            times[n].append(time.perf_counter() - t0)
    return times


def peak_memory(fn, device):
    """Bytes that fn allocates above what was allocated before it, at their peak. CUDA: the allocator's counters.
    CPU: the profiler's record of each allocation and free made during fn, replayed in time order."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(os.path.join(d, "trace.json"))
        with open(os.path.join(d, "trace.json")) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e["ts"]):
        live += e["args"]["Bytes"]
        peak = max(peak, live)
    return peak


def report(name, args, columns, rows, **extra):
    """Print rows as a table (columns: (key, header, format)) and write everything as JSON."""
    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else cpu_name()
    print(f"\n{name}: {args.device.type} ({device}), {args.threads} thread(s), median of {args.runs} runs "
          f"after {args.warmup} warmup, torch {torch.__version__}")
    cells = [[h for _, h, _ in columns]] + [[format(r[k], f) if k in r else "-" for k, _, f in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for k, v in extra.get("ratios", {}).items():
        print(f"{k}: {v:.2f}x")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(bench=name, device=device, args=vars(args) | {"device": str(args.device)},
                       torch=torch.__version__, rows=rows, **extra), f, indent=1)
    print(f"wrote {out}")


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def median_row(seconds, **fields):
    return fields | {"median_s": statistics.median(seconds), "seconds": seconds}


# -----------------------------------------------------------------------------------------------------------
# The models compared: our AR, and transformers' GPT-2 of the same width, depth, heads and vocabulary

def ar_config(args, max_audio):
    return LMConfig(n_text=args.n_text, card=(args.card,), d_model=args.d_model, n_layer=args.n_layer,
                    n_head=args.n_head, dropout=args.dropout, max_text=max(256, args.text), max_audio=max_audio)


def gpt2(args, n_positions):
    """GPT-2 over our AR's output vocabulary (codes + EOS), exact GELU as ours (GPT-2's default is the tanh form),
    our dropout on embeddings and residuals and none in attention (ours has none), SDPA attention (the default)."""
    from transformers import GPT2Config, GPT2LMHeadModel, logging
    logging.set_verbosity_error()
    eos = args.card
    cfg = GPT2Config(vocab_size=args.card + 1, n_positions=n_positions, n_embd=args.d_model, n_layer=args.n_layer,
                     n_head=args.n_head, activation_function="gelu", resid_pdrop=args.dropout,
                     embd_pdrop=args.dropout, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return GPT2LMHeadModel(cfg).to(args.device)


def random_examples(args, n, target, g):
    """n AR examples (text ids, prompt [1, --prompt], target [1, L]); L from target(): one int per example."""
    return [(torch.randint(1, args.n_text, (args.text,), generator=g).tolist(),
             torch.randint(0, args.card, (1, args.prompt), generator=g),
             torch.randint(0, args.card, (1, target()), generator=g)) for _ in range(n)]


# -----------------------------------------------------------------------------------------------------------
# Sampling

class NoEOS(AR):
    """Our AR with its EOS logit at -inf, so that every sequence runs to the length limit and every system writes
    exactly --new tokens (transformers' generate does the same with min_new_tokens). AR.generate, the sampler under
    test, is unchanged: only the logits it reads are."""

    def forward(self, *a, **kw):
        logits = super().forward(*a, **kw)
        logits[..., self.eos] = -float("inf")
        return logits


def bench_sampling(args):
    dev, P = args.device, args.text + args.prompt
    torch.manual_seed(args.seed)
    ours = NoEOS(ar_config(args, args.prompt + args.new)).to(dev).eval()
    hf = gpt2(args, P + args.new).eval()
    # AR.generate stops at ceil(ratio * text length) = --new frames (frame_rate 1: the limit in frames per token)
    ratio = (args.new - 0.5) / args.text
    rows, ratios = [], {}
    for B in args.batches:
        g = torch.Generator().manual_seed(args.seed + B)
        ex = random_examples(args, B, lambda: 1, g)  # (their targets are not used)
        texts, prompts = [t for t, _, _ in ex], [p for _, p, _ in ex]
        ids = torch.cat([torch.tensor(texts), torch.cat(prompts)], 1).to(dev)  # GPT-2 reads the same ids, one table

        def ours_fn(use_cache):
            codes, _ = ours.generate(texts, prompts, top_k=args.top_k, seconds_per_token=ratio, frame_rate=1,
                                     use_cache=use_cache)
            assert all(len(c) == args.new for c in codes)

        def hf_fn():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=args.top_k,
                              temperature=1.0, min_new_tokens=args.new, max_new_tokens=args.new)
            assert out.shape == (B, P + args.new)

        systems = {"ours, KV cache": lambda: ours_fn(True), "transformers generate": hf_fn}
        if B in args.no_cache_batches:  # O(length^2): at --new 500 a run at batch 16 takes minutes on a CPU
            systems["ours, no cache"] = lambda: ours_fn(False)
        for name, s in race(systems, args).items():
            rows.append(median_row(s, system=name, batch=B))
            rows[-1]["new_tokens_per_s"] = B * args.new / rows[-1]["median_s"]
        speed = {r["system"]: r["new_tokens_per_s"] for r in rows if r["batch"] == B}
        ratios[f"batch {B}: KV cache / transformers"] = speed["ours, KV cache"] / speed["transformers generate"]
        if "ours, no cache" in speed:
            ratios[f"batch {B}: KV cache / no cache"] = speed["ours, KV cache"] / speed["ours, no cache"]
    report("sampling", args, [("system", "system", ""), ("batch", "batch", "d"), ("median_s", "s/run", ".3f"),
                              ("new_tokens_per_s", "new tokens/s", ".1f")], rows, ratios=ratios)


# -----------------------------------------------------------------------------------------------------------
# Training step: forward, backward, gradient clip, AdamW (train_codec_lm.py's settings)

def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.95))


def train_setup(args):
    """Our AR, its optimizer and a batch of --batch examples of --target frames (all one length: no padding)."""
    torch.manual_seed(args.seed)
    ours = AR(ar_config(args, args.prompt + args.target + 1)).to(args.device).train()
    b = ours.batch(random_examples(args, args.batch, lambda: args.target, torch.Generator().manual_seed(args.seed)),
                   device=args.device)
    return ours, adamw(ours), b


def bench_train(args):
    ours, opt, b = train_setup(args)
    hf = gpt2(args, b["valid"].shape[1]).train()
    hf_opt = adamw(hf)
    ids = torch.where(b["is_audio"], b["audio"][:, 0], b["text"])  # the same tokens, from one table
    labels = torch.where(b["is_audio"] & (b["pos"] >= 0), ids, -100)  # the target frames (GPT-2 shifts)

    def hf_step():
        with autocast(args.precision, args.device):
            loss = hf(input_ids=ids, labels=labels).loss
        hf_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()

    full = copy.deepcopy(ours)  # the same weights, stepped by the earlier loss
    full_opt = adamw(full)

    def full_head_step():  # before lm_loss computed the head at scored positions only
        with autocast(args.precision, args.device):
            loss = full_head_loss(full, b)
        full_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(full.parameters(), 1.0)
        full_opt.step()

    times = race({"ours (train_step)": lambda: train_step(ours, opt, b, autocast(args.precision, args.device), 1.0),
                  "transformers GPT-2": hf_step, "ours, head at every position": full_head_step}, args)
    rows = [median_row(s, system=n, precision=args.precision, tokens=b["valid"].numel()) for n, s in times.items()]
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["median_s"]
    report(f"train_{args.precision}", args, [("system", "system", ""), ("precision", "precision", ""),
                                               ("tokens", "tokens/step", "d"), ("median_s", "s/step", ".3f"),
                                               ("tokens_per_s", "tokens/s", ".0f")], rows,
           ratios={"ours / transformers": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"],
                   "ours, head at every position / transformers": rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"]})


def full_head_loss(model, b):
    """lm_loss as it was: logits and log-softmax at every position, the unscored ones (-100) ignored."""
    return F.cross_entropy(model(**b).float().flatten(0, 1), b["targets"].flatten())


# -----------------------------------------------------------------------------------------------------------
# DPO step: speechalign.train_round, one step of --pairs pairs, with the reference log-probs precomputed once per
# round (what align() does) or from a live reference forward at every step

class Lookup:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, key):
        return self.fn(key)


def live_reference(reference, pairs, idx, device):
    """Stands in for the precomputed {side: log-probs} that dpo_step reads as ref[side][batch]: it runs the
    frozen reference on those pairs then, after the policy's forward (the order of TRL's DPOTrainer when it does
    not precompute)."""
    @torch.no_grad()
    def logps(side, batch):  # batch: rows of the round's pairs, i.e. positions in idx
        return ar_logps(reference, pair_examples(pairs, [idx[r] for r in batch], side), device)[0]
    return Lookup(lambda side: Lookup(lambda batch: logps(side, batch)))


def bench_dpo(args):
    dev, n = args.device, args.pairs
    torch.manual_seed(args.seed)
    policy = AR(ar_config(args, args.prompt + 2 * args.target)).to(dev).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    g = torch.Generator().manual_seed(args.seed)
    length = lambda: int(torch.randint(args.target * 4 // 5, args.target * 6 // 5 + 1, (1,), generator=g))
    ex = random_examples(args, n, length, g)
    pairs = dict(texts=[t for t, _, _ in ex], prompts=[p for _, p, _ in ex], chosen=[c[0] for _, _, c in ex],
                 rejected=[torch.randint(0, args.card, (length(),), generator=g) for _ in ex], pair_utt=list(range(n)),
                 hit_limit=torch.zeros(n, dtype=torch.bool))
    idx = list(range(n))
    a = replace(AlignArgs(), steps=1, batch_size=n, warmup=1, precision=args.precision)
    with autocast(args.precision, dev):  # as align() takes it
        pre = reference_logps(reference, pairs, idx, n, dev)
    steps = {"precomputed reference": lambda: train_round(policy, pairs, idx, pre, a),
             "live reference forward": lambda: train_round(policy, pairs, idx, live_reference(reference, pairs, idx,
                                                                                              dev), a)}
    def once_a_round():
        with autocast(args.precision, dev):
            return reference_logps(reference, pairs, idx, n, dev)

    times = race(steps | {"reference_logps (once a round)": once_a_round}, args)
    peaks = {k: [peak_memory(fn, dev) for _ in range(args.runs)] for k, fn in steps.items()}
    ref_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    rows = []
    for k, s in times.items():
        r = median_row(s, system=k, pairs=n)
        r["ms_per_pair"] = 1e3 * r["median_s"] / n
        if k in peaks:
            r["peak_mb"] = statistics.median(peaks[k]) / 2**20
            r["peak_mb_per_pair"] = r["peak_mb"] / n
            r["resident_reference_mb"] = ref_bytes / 2**20 if k == "live reference forward" else 0.0
        rows.append(r)
    report(f"dpo_{args.precision}", args,
           [("system", "system", ""), ("pairs", "pairs", "d"), ("median_s", "s/step", ".3f"),
            ("ms_per_pair", "ms/pair", ".1f"), ("peak_mb", "step peak MB", ".1f"),
            ("peak_mb_per_pair", "MB/pair", ".2f"), ("resident_reference_mb", "reference weights MB", ".1f")],
           rows, ratios={"live / precomputed, time": rows[1]["median_s"] / rows[0]["median_s"],
                         "live / precomputed, step peak memory": rows[1]["peak_mb"] / rows[0]["peak_mb"]},
           notes="step peak: memory allocated during one train_round step above what was live before it "
                 "(activations, gradients, and AdamW's state, which train_round allocates at its first step); "
                 "reference_logps runs under the run's autocast, as align() calls it")


# -----------------------------------------------------------------------------------------------------------
# MFU of pretraining

def train_flops(model, b):
    """FLOPs of one training step, PaLM's count (as nanoGPT's estimate_mfu): per token, 6 per weight of every
    matmul (2 forward, 4 backward) and 12 * n_layer * d_model * T for attention scores and mixing. The output
    head counts at the scored tokens alone: lm_loss runs it nowhere else."""
    head = model.head.weight.numel()
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)) - head
    B, T = b["valid"].shape
    scored = int((b["targets"] != -100).sum())
    return B * T * (6 * n + 12 * model.cfg.n_layer * model.cfg.d_model * T) + 6 * head * scored


def bench_mfu(args):
    dev = args.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak is None:
        print(f"mfu: needs a CUDA device we know the peak of ({', '.join(PEAK_TFLOPS)}) or --peak_tflops; skipped")
        return
    ours, opt, b = train_setup(args)
    flops = train_flops(ours, b)
    step = lambda: train_step(ours, opt, b, autocast(args.precision, args.device), 1.0)
    s = race({"ours (train_step)": step}, args)["ours (train_step)"]
    r = median_row(s, system=f"AR {args.n_layer} x {args.d_model}, {args.card} codes", precision=args.precision,
                   tokens=b["valid"].numel(), tflops_per_step=flops / 1e12, peak_tflops=peak)
    r["tokens_per_s"] = r["tokens"] / r["median_s"]
    r["mfu"] = flops / r["median_s"] / (peak * 1e12)
    report(f"mfu_{args.precision}", args, [("system", "system", ""), ("precision", "precision", ""),
                                           ("tokens", "tokens/step", "d"), ("median_s", "s/step", ".3f"),
                                           ("tokens_per_s", "tokens/s", ".0f"), ("peak_tflops", "peak TFLOP/s", ".0f"),
                                           ("mfu", "MFU", ".3f")], [r])


# -----------------------------------------------------------------------------------------------------------

def ints(s):
    return [int(x) for x in s.split(",") if x]


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="bench", required=True)
    toy = dict(d_model=256, n_layer=4, n_head=4, card=1024, n_text=77, text=40, prompt=150)
    for name, defaults, help in [
            ("sampling", toy, "new tokens/s of AR sampling"),
            ("train", toy | dict(batch=16, target=300), "tokens/s of a training step"),
            ("dpo", toy | dict(pairs=16, target=250), "time and peak memory of a DPO step per pair"),
            ("mfu", dict(d_model=768, n_layer=12, n_head=12, card=1024, n_text=77, text=80, prompt=225, batch=16,
                         target=600, precision="bf16"), "MFU of pretraining (EnCodec 24 kHz: 75 Hz, 1024 codes)")]:
        p = sub.add_parser(name, help=help)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
        p.add_argument("--runs", type=int, default=5, help="timed runs per figure (the median is reported)")
        p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=None, help="JSON path (default bench/results/<name>.json)")
        for k in ("d_model", "n_layer", "n_head", "card", "n_text", "text", "prompt"):
            p.add_argument(f"--{k}", type=int)
        p.add_argument("--dropout", type=float, default=0.0)
        if name == "sampling":
            p.add_argument("--batches", type=ints, default=[1, 16, 64])
            p.add_argument("--new", type=int, default=500, help="new tokens per sequence")
            p.add_argument("--no_cache_batches", type=ints, default=[1], help="batches that also run the no-cache path")
            p.add_argument("--top_k", type=int, default=50)
        else:
            p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
            p.add_argument("--pairs" if name == "dpo" else "--batch", type=int)
            p.add_argument("--target", type=int, help="target frames per example")
        if name == "mfu":
            p.add_argument("--peak_tflops", type=float, default=None, help="the device's peak (default: known GPUs)")
        p.set_defaults(**defaults)
    args = ap.parse_args(argv)
    args.device = torch.device(args.device)
    return args


def main(argv=None):
    args = get_args(argv)
    torch.set_num_threads(args.threads)
    dict(sampling=bench_sampling, train=bench_train, dpo=bench_dpo, mfu=bench_mfu)[args.bench](args)


if __name__ == "__main__":
    main()
