"""Pretrain the codec LM -- the AR (layer 1) or the NAR (layers 2..Q) -- on a tokenised corpus.

    python train_codec_lm.py --model ar  --out runs/sft/ar.pt  --train data/toy_corpus/train.pt
    python train_codec_lm.py --model nar --out runs/sft/nar.pt --train data/toy_corpus/train.pt
    python train_codec_lm.py --model ar  --out runs/sft/ar.pt  --resume          # carry on where it stopped
    torchrun --nproc_per_node 4 train_codec_lm.py --model ar ...                  # several GPUs (DDP)

On a 2-core CPU run the AR and the NAR as two processes side by side (one thread each). The checkpoint
(config, step, model, optimizer, RNG, tokenizer, codec) is rewritten atomically every --ckpt_every steps;
--resume continues from it and follows the same trajectory as an uninterrupted run. A JSONL log sits
beside it (`<out>.log.jsonl`): training loss, lr, tokens/s, and validation loss at intervals.
"""
import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
from tqdm import tqdm

from codec import load_corpus, load_pt, write_text
from speechalign import (AR, NAR, LMConfig, TextTokenizer, autocast, check_same, dataclass_parser,
                         lm_loss, make_examples, save_checkpoint, too_long)


@dataclass
class TrainArgs:
    """Pretraining settings: one --flag each (speechalign.dataclass_parser). All of them are stored in
    the checkpoint's args, which --resume compares with the run's."""
    model: str = field(metadata={"help": "which model to train", "choices": ["ar", "nar"]})
    out: str = field(metadata={"help": "checkpoint path"})
    train: str = field(default="data/toy_corpus/train.pt", metadata={
        "help": "tokenised training corpus"})
    extra_train: str = field(default=None, metadata={
        "help": "more tokenised corpora to train on, of the same codec (e.g. the NAR's extra voices: "
                "data/tokenize_corpus.py --speed). The text tokenizer is --train's; their texts must fit it",
        "nargs": "+"})
    val: str = field(default="data/toy_corpus/dev_seen.pt", metadata={
        "help": "tokenised validation corpus (a dev split: the test splits only report)"})
    text: str = field(default="phonemes", metadata={
        "help": "what the text tokenizer reads", "choices": ["phonemes", "letters"]})
    prompt_seconds: float = field(default=3.0, metadata={
        "help": "cross-sentence prompt length (the longest, given --prompt_seconds_min); "
                "validation uses it"})
    prompt_seconds_min: float = field(default=None, metadata={
        "help": "draw each training example's prompt length uniformly from [this, "
                "--prompt_seconds], afresh each epoch (VALL-E-style), so the AR does not learn one "
                "prompt length. Default: --prompt_seconds, a fixed length"})
    short_first: bool = field(default=False, metadata={
        "help": "curriculum: the first epoch's batches go from the shortest targets to the longest",
        "action": "store_true"})
    d_model: int = field(default=256, metadata={"help": "transformer width"})
    n_layer: int = field(default=6, metadata={"help": "transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    dropout: float = field(default=0.1, metadata={"help": "residual and MLP dropout"})
    max_text: int = field(default=256, metadata={
        "help": "text positions: longer texts are skipped"})
    max_audio: int = field(default=1024, metadata={
        "help": "audio positions, in frames: utterances whose prompt + target + EOS is longer are "
                "skipped (at 75 Hz, a 3 s prompt and a 20 s utterance need 1726)"})
    batch_size: int = field(default=16, metadata={
        "help": "examples per step (over all processes)"})
    steps: int = field(default=20000, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the cosine"})
    warmup: int = field(default=500, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    eval_every: int = field(default=500, metadata={"help": "steps between validation losses"})
    eval_utts: int = field(default=128, metadata={"help": "validation utterances"})
    ckpt_every: int = field(default=250, metadata={"help": "steps between checkpoints"})
    snapshot_every: int = field(default=0, metadata={
        "help": "also keep the weights every N steps as <out>.stepN.pt (for a curve of WER "
                "against steps)"})
    precision: str = field(default="auto", metadata={
        "help": "auto: bf16 autocast on CUDA, fp32 on the CPU; master weights and log-probs stay "
                "fp32 either way. bf16 on a CPU pays only with native bf16 (AVX512-BF16, AMX); "
                "without it, it is many times slower (data/README.md)",
        "choices": ["auto", "fp32", "bf16"]})
    seed: int = field(default=0, metadata={"help": "seeds the model, the batches and the prompts"})
    threads: int = field(default=1, metadata={"help": "CPU threads per process"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the checkpoint at --out", "action": "store_true"})
    export: str = field(default=None, metadata={
        "help": "when the run has reached --steps, also write the shipped form to PATH: the "
                "weights in bf16, no optimizer (half the size; data/toy/sft_{ar,nar}.pt are made "
                "so)", "metavar": "PATH"})
    stop_after: int = field(default=None, metadata={"help": "exit after this step (for tests)"})


def get_args(argv=None):
    ap = dataclass_parser(TrainArgs, description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    args = TrainArgs(**vars(ap.parse_args(argv)))
    if args.prompt_seconds_min is None:
        args.prompt_seconds_min = args.prompt_seconds  # the checkpoint's args say which were drawn
    elif not 0 < args.prompt_seconds_min <= args.prompt_seconds:
        ap.error(f"--prompt_seconds_min {args.prompt_seconds_min:g} must be > 0 and <= "
                 f"--prompt_seconds {args.prompt_seconds:g}")
    return args


def lr_at(step, args):
    """Linear warmup, then cosine decay from lr to min_lr over the remaining steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def batch_for_step(model, examples_for, step, args, world, rank, device):
    """The batch of a step is a function of (seed, step) alone, so a resumed run sees the same data.
    Each epoch draws fresh prompts and a fresh order; examples of similar length share a batch (sorted
    within windows of 50 batches) to waste less compute on padding. With --short_first, epoch 0 is sorted
    as a whole instead (ties in the random order) and its batches go from the shortest targets to the longest."""
    examples = examples_for(step)
    per_epoch = len(examples) // args.batch_size
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    length = lambda i: examples[i][2].shape[1]
    # the leftover len % batch_size examples of the order are skipped this epoch, never a short batch
    if args.short_first and epoch == 0:
        chunk = sorted(order[:per_epoch * args.batch_size], key=length)
        idx = chunk[k * args.batch_size:(k + 1) * args.batch_size][rank::world]
    else:
        window = args.batch_size * 50
        w0 = (k * args.batch_size) // window * window
        chunk = sorted(order[w0:min(w0 + window, per_epoch * args.batch_size)], key=length)
        batches = [chunk[i:i + args.batch_size] for i in range(0, len(chunk), args.batch_size)]
        perm = torch.randperm(len(batches), generator=g).tolist()  # batch order inside the window
        idx = batches[perm[k - w0 // args.batch_size]][rank::world]
    chosen = [examples[i] for i in idx]
    if args.model == "ar":
        return model.batch(chosen, device=device)
    j = int(torch.randint(1, len(model.cfg.card), (1,), generator=torch.Generator().manual_seed(step)))
    return model.batch(chosen, j, device=device)


def train_step(net, opt, b, amp, grad_clip):
    """One optimizer step on batch b (forward under the autocast context `amp`, backward, gradient clip, AdamW);
    returns the loss and the gradient norm. `net` may be the DDP wrapper; bench/bench.py times this step.

    Under DDP, b is this process's shard of the global batch, and the step is the one a single process would
    take on the whole batch: the loss is the mean over the global batch's tokens. DDP averages the processes'
    gradients, so each one backpropagates its summed token loss times world / (global token count); its own
    shard's mean would weight each token by 1 / (its shard's count), and shards of different lengths differ."""
    with amp:
        loss = lm_loss(net, b)
    mean = loss.detach()
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        n = (b["targets"] != -100).sum()
        sums = torch.stack([mean * n, n.to(mean.dtype)])  # this shard's summed token loss and token count
        dist.all_reduce(sums)
        mean = sums[0] / sums[1]
        loss = loss * (n * dist.get_world_size() / sums[1])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    return mean, norm


@torch.no_grad()
def validate(model, val_examples, args, device):
    """Mean token cross-entropy on held-out examples (for the NAR: averaged over layers 2..Q)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val_examples), args.batch_size):
        chunk = val_examples[i:i + args.batch_size]
        layers = [None] if args.model == "ar" else range(1, len(model.cfg.card))
        for j in layers:
            b = model.batch(chunk, device=device) if j is None else model.batch(chunk, j, device=device)
            n = (b["targets"] != -100).sum().item()
            total += lm_loss(model, b).item() * n
            count += n
    model.train()
    return total / count


def joined(corpus, extra, path):
    """A corpus with another one's utterances after its own (--extra_train); an id may occur once only. The
    text tokenizer is built from --train's texts before this, so that the extra corpora change no token id."""
    repeated = set(corpus["ids"]) & set(extra["ids"])
    if repeated:
        raise SystemExit(f"{path}: {len(repeated)} utterance ids are in the training corpus already, e.g. "
                         f"{sorted(repeated)[0]}")
    return corpus | {k: corpus[k] + extra[k] for k in ("ids", "texts", "phonemes", "speakers", "utts")}


def load_resume_checkpoint(args):
    """The checkpoint --resume continues from. It must come from a run of this model on the same corpus and
    model shape: the model is rebuilt from the checkpoint's config and tokenizer, so other settings would be
    silently ignored (or the run would continue on another corpus). The settings that decide which examples
    a step sees (seed, batch size, prompt lengths, --short_first) must match too, or the resumed run would not
    follow the uninterrupted one. --steps may change (a longer schedule)."""
    if not os.path.exists(args.out):
        raise SystemExit(f"--resume: no checkpoint at {args.out}")
    ckpt = load_pt(args.out, "checkpoint")
    data_order = ["seed", "batch_size", "prompt_seconds", "prompt_seconds_min", "short_first"]
    same = ["model", "train", "extra_train", "text", *data_order,
            *(f.name for f in fields(LMConfig) if f.name in vars(args))]
    # checkpoints from before --prompt_seconds_min, --short_first and --extra_train drew fixed prompts in random order
    # from --train alone
    stored = {"prompt_seconds_min": ckpt["args"].get("prompt_seconds"), "short_first": False,
              "extra_train": None} | ckpt["args"]
    check_same("checkpoint", args.out, stored, {k: getattr(args, k) for k in same})
    return ckpt


def trim_log(path, step):
    """On resume, drop the log's records of steps after the checkpoint's: they are redone. A last line cut short
    (the process was killed while writing it) is such a record; a damaged line before it is refused."""
    lines = open(path).readlines()
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise SystemExit(f"{path} line {n} is not a JSON record: mend or delete that line, then resume again")
        if rec["step"] <= step:
            kept.append(line)
    write_text(path, "".join(kept))  # atomically: a kill now loses no record


def main(argv=None):
    args = get_args(argv)
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
        if torch.cuda.is_available():
            torch.cuda.set_device(device)  # else NCCL may put every rank's collectives on GPU 0
    else:
        rank, world = 0, 1
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.batch_size % world:
        raise SystemExit(f"--batch_size {args.batch_size} must be a multiple of the {world} processes")
    torch.set_num_threads(args.threads)
    master = rank == 0

    ckpt = load_resume_checkpoint(args) if args.resume else None  # before the corpora: refuse a wrong one fast
    train, val = load_corpus(args.train), load_corpus(args.val)
    extras = [(path, load_corpus(path)) for path in args.extra_train or []]
    for path, corpus in [(args.val, val), *extras]:
        if corpus["codec"]["name"] != train["codec"]["name"]:
            raise SystemExit(f"{args.train} and {path} come from different codecs: "
                             f"{train['codec']['name']} vs {corpus['codec']['name']}")
    base = train  # the tokenizer's texts
    for path, corpus in extras:
        train = joined(train, corpus, path)
    frame_rate = train["codec"]["frame_rate"]
    if ckpt:
        tok = TextTokenizer(ckpt["tokenizer"]["symbols"], ckpt["tokenizer"]["kind"])
        cfg = LMConfig(**ckpt["config"])
    else:
        tok = TextTokenizer.build(base["phonemes"] if args.text == "phonemes" else base["texts"], args.text)
        cfg = LMConfig(n_text=len(tok.symbols), card=tuple(train["codec"]["card"]), d_model=args.d_model,
                       n_layer=args.n_layer, n_head=args.n_head, dropout=args.dropout, max_text=args.max_text,
                       max_audio=args.max_audio)
    torch.manual_seed(args.seed)
    model = (AR if args.model == "ar" else NAR)(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    step = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        if "cuda_rng" in ckpt and "cuda" in str(device):  # dropout on a GPU draws from the CUDA generator
            torch.cuda.set_rng_state(ckpt["cuda_rng"], device)
        step = ckpt["step"]
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=args.model == "nar") if ddp else model

    def fitting(corpus, examples, path):
        """Indices of the examples that fit the model's positions (speechalign.too_long), judged with the longest
        prompt make_examples cuts (--prompt_seconds, the top of a drawn range), so that every epoch's fresh
        prompts keep the same utterances (and the same steps per epoch, which --resume relies on). The others
        are skipped, and counted here once."""
        longest = int(args.prompt_seconds * frame_rate)
        why = {i: w for i, e in enumerate(examples) if (w := too_long(e, cfg.max_text, cfg.max_audio, longest))}
        if why and master:
            i = next(iter(why))
            print(f"{path}: {len(why)} of {len(examples)} utterances skipped, longer than the model's positions "
                  f"({cfg.max_text} text, {cfg.max_audio} audio frames; e.g. {corpus['ids'][i]}: {why[i]})")
        return [i for i in range(len(examples)) if i not in why]

    def epoch_examples(epoch):  # fresh cross-sentence prompts (and prompt lengths) each epoch
        return make_examples(train, tok, args.prompt_seconds, seed=args.seed * 7919 + epoch, frame_rate=frame_rate,
                             prompt_seconds_min=args.prompt_seconds_min)

    first = epoch_examples(0)
    keep = fitting(train, first, args.train)
    if len(keep) < args.batch_size:
        raise SystemExit(f"{args.train}: {len(keep)} utterances fit the model's positions, fewer than --batch_size "
                         f"{args.batch_size}")
    cache = dict(epoch=0, ex=[first[i] for i in keep])

    def examples_for(step):  # the epoch's examples, cached for the current one
        epoch = step // (len(keep) // args.batch_size)
        if cache["epoch"] != epoch:
            ex = epoch_examples(epoch)
            cache.update(epoch=epoch, ex=[ex[i] for i in keep])
        return cache["ex"]

    val_examples = make_examples(val, tok, args.prompt_seconds, seed=12345, frame_rate=frame_rate)
    val_examples = [val_examples[i] for i in fitting(val, val_examples, args.val)][:args.eval_utts]
    if not val_examples:
        raise SystemExit(f"{args.val}: no utterance fits the model's positions")
    log_path = args.out + ".log.jsonl"
    if master:  # the README's commands write into runs/.../sft/, which a fresh clone does not have
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    if master and ckpt and os.path.exists(log_path):
        trim_log(log_path, step)
    log = open(log_path, "a" if ckpt else "w") if master else None
    on_cuda = "cuda" in str(device)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and on_cuda)
    amp = autocast("bf16" if bf16 else "fp32", device)

    def checkpoint(path=args.out, full=True, dtype=None):
        weights = {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in model.state_dict().items()}
        state = dict(kind=args.model, config=asdict(cfg), step=step, model=weights, args=asdict(args),
                     tokenizer={"symbols": tok.symbols, "kind": tok.kind}, codec=train["codec"])
        if full:  # what --resume needs on top of the weights
            state |= dict(optimizer=opt.state_dict(), rng=torch.get_rng_state(),
                          **({"cuda_rng": torch.cuda.get_rng_state(device)} if on_cuda else {}))
        save_checkpoint(path, **state)

    model.train()
    bar = tqdm(total=args.steps, initial=step, desc=f"train {args.model}", disable=not master)
    t0, tokens = time.time(), 0
    while step < args.steps:
        b = batch_for_step(model, examples_for, step, args, world, rank, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss, norm = train_step(net, opt, b, amp, args.grad_clip)
        step += 1
        tokens += int(b["valid"].sum()) * world
        if master:
            rec = {"step": step, "loss": round(loss.item(), 5), "lr": lr_at(step - 1, args),
                   "grad_norm": round(norm.item(), 4), "tokens_per_s": round(tokens / (time.time() - t0), 1)}
            if step % args.eval_every == 0 or step == args.steps:
                rec["val_loss"] = round(validate(model, val_examples, args, device), 5)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            **({"val": rec["val_loss"]} if "val_loss" in rec else {}))
            bar.update(1)
            if step % args.ckpt_every == 0 or step == args.steps:
                checkpoint()
            if args.snapshot_every and step % args.snapshot_every == 0:
                checkpoint(f"{args.out.removesuffix('.pt')}.step{step}.pt", full=False)
        if args.stop_after is not None and step >= args.stop_after:
            break
    if master and step % args.ckpt_every and step != args.steps:
        checkpoint()
    if master and args.export and step == args.steps:
        checkpoint(args.export, full=False, dtype=torch.bfloat16)
    bar.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
