"""The main job: SpeechAlign's toy reproduction, one command from the shipped SFT model to the report.

    python reproduce.py                    # 3 DPO rounds, the control, evaluation, report (wall time: README.md)
    python reproduce.py --preset smoke     # the same pipeline at a tiny size, < 2 min (the tests run it)
    python reproduce.py --from_scratch     # first synthesise the corpus, fit the codec and pretrain (hours more)

Every stage is one of the project's scripts, run as a subprocess with its own progress bars; each resumes or
skips what it finished before (speechalign.py keeps finished rounds, eval.py caches every scored system,
pretraining resumes from its checkpoint), so re-running this command after an interruption carries on.
Two lanes run side by side, one per core:
    DPO rounds 1..3                  |  control (continued SFT), then eval.py on the baselines + the SFT model
    then each new system is scored (eval.py --score_only) by whichever lane is free
    a last eval.py writes the report from the cache -> the claims checked on its numbers
The last lines printed are the results table, the claims, the listening page's path and the report's (OUT/report.md).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from eval import write_text
from speechalign import parse_args as align_args

PY = sys.executable
# DPO and the NAR run under bf16 autocast where the CPU computes bf16 natively (AVX512-BF16 or AMX: about
# 2x faster than fp32); on other CPUs bf16 is emulated and many times slower than fp32 (data/README.md).
PRECISION = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"

# The tape speeds that make new voices from the training audio: for the toy codec's fitting (fit_toy_codec --tape)
# and for the NAR's extra corpus (tokenize_corpus --speed)
TAPE = ["0.82", "0.9", "1.1", "1.2"]
# What differs between the presets; everything else is each script's default (AlignArgs: the toy recipe).
PRESETS = {
    "toy": dict(
        align=[],  # speechalign.AlignArgs defaults are the toy recipe
        eval=["--n_seen", "200", "--n_unseen", "100"],
        corpus=[],
        val="dev_seen",  # pretraining's validation split
        codec=["--envelope", "24", "--tape", *TAPE],  # + --extra the codec_fit split
        subset=["--limit", "3000"],
        ar=["--d_model", "256", "--n_layer", "4", "--n_head", "4", "--steps", "5000", "--warmup", "300",
            "--eval_every", "500", "--snapshot_every", "500", "--prompt_seconds_min", "1", "--short_first"],
        nar=["--d_model", "256", "--n_layer", "4", "--n_head", "4", "--steps", "3000", "--warmup", "300",
             "--eval_every", "500", "--eval_utts", "64", "--snapshot_every", "500", "--prompt_seconds_min", "1",
             "--short_first"]),
    "smoke": dict(
        align=["--n_utts", "6", "--k", "1", "--steps", "2", "--batch_size", "3", "--warmup", "1",
               "--sample_batch", "8"],
        eval=["--n_seen", "3", "--n_unseen", "3", "--seconds_per_token", "0.04", "--n_samples", "1", "--n_boot", "200"],
        val="full",  # its 180 training utterances do not hold every phoneme of the dev sentences
        corpus=["--train_per_speaker", "30", "--test_per_speaker", "2", "--unseen_per_speaker", "2",
                "--dev_per_speaker", "1", "--dev_unseen_per_speaker", "1", "--dev_oog", "6",
                "--codec_fit_per_voice", "2"],  # two: a voice the NAR trains on needs another utterance to prompt
        codec=["--card", "64", "16", "16", "16", "16", "16", "16", "16", "--eval_utts", "4"],
        subset=["--limit", "18"],
        ar=["--d_model", "32", "--n_layer", "1", "--n_head", "2", "--steps", "4", "--warmup", "1", "--batch_size", "4",
            "--eval_every", "1000", "--eval_utts", "4"],
        nar=["--d_model", "32", "--n_layer", "1", "--n_head", "2", "--steps", "4", "--warmup", "1", "--batch_size", "4",
             "--eval_every", "1000", "--eval_utts", "4"]),
}
SHIPPED = dict(ar="data/toy/sft_ar.pt", nar="data/toy/sft_nar.pt", codec="data/toy/codec.pt",
               train="data/toy/train_subset.pt", test_seen="data/toy/test_seen.pt",
               test_unseen="data/toy/test_unseen.pt")


def schedule(tasks, timings, lanes=2):
    """Run tasks [(name, script args, names of the tasks it needs)] as subprocesses, at most `lanes` at a
    time (one per core): a free lane starts the first task in list order whose needs are done. Lane w draws
    its progress bars on terminal line w (tqdm reads TQDM_*; an empty TQDM_LEAVE clears a finished bar
    there). If a task fails, the others are stopped; everything finished is kept for the next run."""
    waiting, done, running = list(tasks), set(), {}  # running: lane -> (name, process, start time)
    while waiting or running:
        for w in sorted(set(range(lanes)) - set(running)):
            ready = [t for t in waiting if set(t[2]) <= done]
            if not ready:
                break
            waiting.remove(ready[0])
            name, cmd, _ = ready[0]
            print(f"\n== {name}: {' '.join(cmd)}", flush=True)
            env = os.environ | ({"TQDM_POSITION": str(w), "TQDM_LEAVE": ""} if w else {})
            running[w] = (name, subprocess.Popen([PY, *cmd], env=env), time.time())
        if not running:
            sys.exit(f"stages {', '.join(t[0] for t in waiting)} need stages that are not in the list")
        time.sleep(0.5)  # the stages take seconds to hours: polling costs nothing
        for w, (name, proc, t0) in list(running.items()):
            if (code := proc.poll()) is None:
                continue
            del running[w]
            if code:
                for _, other, _ in running.values():
                    other.terminate()
                    other.wait()
                sys.exit(f"stage {name} (exit {code}) failed; fix the cause and re-run: finished work is kept")
            done.add(name)
            timings[name] = round(time.time() - t0, 1)
            print(f"== {name}: done in {timings[name] / 60:.1f} min", flush=True)


def from_scratch(out, p, timings):
    """Corpus (flite + espeak-ng) -> codec -> tokenised splits -> AR and NAR pretraining side by side."""
    corpus, data = os.path.join(out, "corpus"), os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    splits = ("dev_seen", "dev_unseen", "dev_oog", "test_seen", "test_unseen")
    files = dict(codec=os.path.join(data, "codec.pt"), train=os.path.join(data, "train_subset.pt"),
                 full=os.path.join(data, "train.pt"), tape=os.path.join(data, "train_tape.pt"),
                 codec_fit=os.path.join(data, "codec_fit.pt"), **{s: os.path.join(data, f"{s}.pt") for s in splits},
                 ar=os.path.join(out, "sft", "sft_ar.pt"), nar=os.path.join(out, "sft", "sft_nar.pt"))
    tasks = []
    if not os.path.exists(os.path.join(corpus, "test_unseen.jsonl")):  # written last
        tasks.append(("corpus", ["data/make_toy_corpus.py", "--out", corpus, *p["corpus"]], []))
    if not os.path.exists(files["codec"]):
        tasks.append(("codec", ["data/fit_toy_codec.py", os.path.join(corpus, "train.jsonl"), files["codec"],
                                "--extra", os.path.join(corpus, "codec_fit.jsonl"), *p["codec"]],
                      [t[0] for t in tasks]))
    made = [t[0] for t in tasks]
    # the NAR also learns from more voices than the six: the training audio heard as tapes at the TAPE speeds
    # (data/tokenize_corpus.py --speed) and the codec_fit split's espeak-ng voices (data/README.md)
    for key, split, extra in (("full", "train", []), *((s, s, []) for s in splits), ("train", "train", p["subset"]),
                              ("tape", "train", ["--speed", *TAPE]), ("codec_fit", "codec_fit", [])):
        if not os.path.exists(files[key]):
            tasks.append((f"tokenise {key}", ["data/tokenize_corpus.py", os.path.join(corpus, f"{split}.jsonl"),
                                              files[key], "--codec", files["codec"], *extra], made))
    for model in ("ar", "nar"):
        ckpt = os.path.join(out, "sft", f"{model}.pt")
        if not os.path.exists(files[model]):
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            cmd = ["train_codec_lm.py", "--model", model, "--out", ckpt, "--train", files["full"], "--val",
                   files[p["val"]], "--export", files[model], *p[model]]
            cmd += ["--extra_train", files["tape"], files["codec_fit"]] if model == "nar" else []
            cmd += ["--resume"] if os.path.exists(ckpt) else []
            tasks.append((f"pretrain {model}", cmd, [t[0] for t in tasks if t[0].startswith("tokenise")]))
    schedule(tasks, timings)
    return files


# ----------------------------------------------------------------------------------------------------------
# The paper's claims, each a rule with a margin on the evaluation's numbers. Differences are the later system
# minus the earlier one on the same utterances, with paired-bootstrap 95% intervals [lo, hi].

STEP_SLACK = 0.02  # a round may be worse than the one before by less than this much WER (upper CI end)
RELATIVE_GAIN = 0.15  # round R's WER this much below SFT's, relative, on the point estimate (the paper: 17%)
SIM_SLACK = 0.005  # SIM may fall by less than this (lower CI end of round R - SFT)


def claims(report, rounds):
    """[(claim, what was measured, held)] and the same as a Markdown table."""
    P, last = report["pairwise"], f"round{rounds}"

    def d(key, metric="delta_wer"):  # (value, lo, hi, "value [lo, hi]")
        v, (lo, hi) = P[key][metric], P[key][f"{metric}_ci"]
        return v, lo, hi, f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    rows = []
    v, lo, hi, m = d("sft_vs_golden_l1_nar")
    rows.append(("the gap: the same NAR gives a higher WER from the SFT AR's layer 1 than from golden layer 1",
                 f"WER sft − golden_l1_nar {m}", lo > 0))
    v, lo, hi, m = d("round1_vs_sft")
    rows.append(("DPO round 1 lowers WER against the SFT model", f"WER round1 − sft {m}", hi < 0))
    if rounds > 1:  # (one round: nothing to accumulate)
        v, lo, hi, m = d(f"{last}_vs_round1")
        rows.append((f"gains accumulate: round {rounds} beats round 1", f"WER {last} − round1 {m}", hi < 0))
        steps = [d(f"round{t}_vs_round{t - 1}") for t in range(2, rounds + 1)]
        rows.append((f"... and no round is worse than the one before by {STEP_SLACK} WER or more (upper CI end)",
                     "; ".join(f"WER round{t} − round{t - 1} {m}" for t, (*_, m) in enumerate(steps, 2)),
                     all(hi < STEP_SLACK for _, _, hi, _ in steps)))
    v, lo, hi, m = d(f"{last}_vs_sft", "rel_wer") if "rel_wer" in P[f"{last}_vs_sft"] else (0, 0, 0, "no SFT error")
    rows.append((f"round {rounds} is at least {RELATIVE_GAIN:.0%} below SFT, relative (the paper: 17%)",
                 f"WER ({last} − sft) / sft {m}", v <= -RELATIVE_GAIN))
    v, lo, hi, m = d(f"control_vs_{last}")
    rows.append((f"DPO beats the continued-SFT control at equal budget after {rounds} rounds",
                 f"WER control − {last} {m}", lo > 0))
    v, lo, hi, m = d(f"{last}_vs_sft", "delta_sim")
    rows.append((f"SIM does not fall by {SIM_SLACK} or more (lower CI end)", f"SIM {last} − sft {m}",
                 lo > -SIM_SLACK))
    v, lo, hi, m = d(f"{last}_vs_sft", "delta_acc")
    accs = " → ".join(f"{report['systems'][n]['gap']['classifier_acc']:.3f}"
                      for n in ["sft"] + [f"round{t}" for t in range(1, rounds + 1)])
    rows.append((f"the golden-vs-synthetic classifier's accuracy falls from SFT to round {rounds}",
                 f"accuracy {accs}; {last} − sft {m}", hi < 0))
    table = ["| claim | measured | held |", "|---|---|---|"]
    table += [f"| {c} | {m} | {'yes' if ok else '**no**'} |" for c, m, ok in rows]
    return table, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="toy")
    ap.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    ap.add_argument("--from_scratch", action="store_true",
                    help="synthesise the corpus (needs flite, festival and espeak-ng), fit the codec, pretrain "
                         "AR and NAR (toy preset: hours on 2 cores; README.md) instead of using data/toy/")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S",
                    help="seeds of the DPO rounds and the control (their rejected samples, prompts and batch "
                         "order: speechalign.py --seed). The first is the main run (OUT/align, OUT/control, "
                         "OUT/eval); each other seed S runs into OUT/seedS/, judged on the same test list against "
                         "the same baselines, and the claims are checked per seed (README: --seeds 0 1 2)")
    args = ap.parse_args()
    if len(set(args.seeds)) < len(args.seeds):
        ap.error(f"--seeds {' '.join(map(str, args.seeds))}: each seed once")
    out, p = args.out or os.path.join("runs", args.preset), PRESETS[args.preset]
    os.makedirs(out, exist_ok=True)
    timings_path = os.path.join(out, "timings.json")
    runs = json.load(open(timings_path)) if os.path.exists(timings_path) else []  # earlier runs' stage times (s)
    runs = runs if isinstance(runs, list) else []  # one dict, from before runs were kept apart: no total to show
    timings, t0 = {}, time.time()
    files = from_scratch(out, p, timings) if args.from_scratch else SHIPPED
    data = ["--train", files["train"]]
    align = ["speechalign.py", "--init", files["ar"], *data, "--precision", PRECISION, "--threads", "1", *p["align"]]
    rounds = align_args(align[1:]).rounds  # as speechalign.py will read the preset's arguments
    ev = ["eval.py", "--nar", files["nar"], "--codec", files["codec"], "--test_seen", files["test_seen"],
          "--test_unseen", files["test_unseen"], "--nar_precision", PRECISION, "--no-golden_l1",  # no claim reads it
          "--cache", os.path.join(out, "eval", "cache"), *p["eval"]]  # one cache: the baselines are scored once
    sft = f"sft={files['ar']}"
    dirs = {s: out if s == args.seeds[0] else os.path.join(out, f"seed{s}") for s in args.seeds}

    # Two lanes (2 cores): the DPO rounds in one, the control and the baselines' evaluation in the other; then
    # each new system is scored by whichever lane is free, and a last eval.py per seed writes its report from
    # the cache. Another seed's rounds start as soon as a lane is free. The control is scored after all rounds'
    # budget only, for the one claim that reads it: each scored system is one more pass of the judges.
    tasks = []
    for seed, run in dirs.items():
        tag = "" if run == out else f" (seed {seed})"
        evs = [*ev, "--out", os.path.join(run, "eval")]
        control = f"control={run}/control/round{rounds}/ar.pt"
        systems = [f"round{t}={run}/align/round{t}/ar.pt" for t in range(1, rounds + 1)] + [control]
        made_by = [(control, "control")] + [(s, "DPO rounds") for s in systems[:rounds]]  # the control is first ready
        score = [(f"score {s.split('=')[0]}{tag}", [*evs, "--score_only", "--ar", s], [task + tag])
                 for s, task in made_by]
        tasks += [("DPO rounds" + tag, [*align, "--seed", str(seed), "--out", os.path.join(run, "align")], []),
                  ("control" + tag, [*align, "--seed", str(seed), "--control", "--out", os.path.join(run, "control")],
                   [])]
        if not tag:
            tasks.append(("eval baselines", [*evs, "--ar", sft], []))
        tasks += [*score, ("eval" + tag, [*evs, *(x for s in [sft] + systems for x in ("--ar", s))],
                           [t[0] for t in score] + ["eval baselines"])]
    schedule(tasks, timings)
    timings["total"] = round(time.time() - t0, 1)
    runs.append(timings)
    write_text(timings_path, json.dumps(runs, indent=1))

    checked = {s: claims(json.load(open(os.path.join(run, "eval", "report.json"))), rounds) for s, run in dirs.items()}
    claim_table, rows = checked[args.seeds[0]]
    seed_table = [f"| claim | {' | '.join(f'seed {s}' for s in dirs)} |", "|---|" + "---|" * len(dirs)]
    for i, (claim, _, _) in enumerate(rows):  # a row per claim, a column per seed
        cells = [f"{'yes' if r[i][2] else '**no**'}: {r[i][1]}" for _, r in checked.values()]
        seed_table.append(f"| {claim} | {' | '.join(cells)} |")
    eval_md = open(os.path.join(out, "eval", "report.md")).read()
    results_table = eval_md.split("\n\n")[1].splitlines()  # the systems table comes first in eval's report
    stages = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items() if k != "total")
    earlier = ", ".join(f"{r['total'] / 60:.1f} min" for r in runs[:-1])
    earlier = f"; earlier runs into {out}: {earlier} (what they finished was skipped here)" if earlier else ""
    seeds = f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds != [0] else ""
    md = [f"# SpeechAlign toy reproduction ({args.preset} preset)", "", "## The paper's claims", "", *claim_table, "",
          *([f"Per seed of the DPO rounds and the control (seed {args.seeds[0]} above; the others' reports: "
             "`seed<S>/eval/report.md`):", "", *seed_table, ""] if len(dirs) > 1 else []),
          f"Wall time of this run: {timings['total'] / 60:.1f} min ({stages}){earlier}.",
          f"Command: `python reproduce.py --preset {args.preset}"
          f"{' --from_scratch' if args.from_scratch else ''}{seeds} --out {out}`.", "",
          "Plots: `eval/metrics.png`, `eval/gap_pca.png`, `eval/training.png`; WAVs: `eval/samples/`; "
          "a page to listen to them: `eval/report.html`.", "",
          eval_md.replace("# Evaluation report", "## Evaluation")]
    write_text(os.path.join(out, "report.md"), "\n".join(md))
    print("\n" + "\n".join(results_table) + "\n\n" + "\n".join(claim_table))
    if len(dirs) > 1:
        print("\n" + "\n".join(seed_table))
    print(f"\nwall time this run: {timings['total'] / 60:.1f} min")
    print(f"listening page: {os.path.join(out, 'eval', 'report.html')}")
    print(f"report: {os.path.join(out, 'report.md')}")


if __name__ == "__main__":
    main()
