"""The main job's pipeline (reproduce.py) at the smoke preset, through a subprocess: it checks that every stage
runs and resumes, not the paper's claims (a tiny run cannot show them). Also the claim checks on a report
made by hand."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from codec import load_corpus
from reproduce import TAPE, claims

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
SYSTEMS = ["golden", "golden_l1_nar", "sft", "round1", "round2", "round3", "control"]  # no golden_l1: no claim reads it


def reproduce(*args):
    r = subprocess.run([sys.executable, "reproduce.py", "--preset", "smoke", *map(str, args)], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def outputs(out):
    """Modification times of everything a finished stage leaves: checkpoints, pairs, the evaluation cache."""
    return {p: p.stat().st_mtime_ns for p in [*out.rglob("*.pt"), *(out / "eval" / "cache").iterdir()]}


def check_run(out, stdout):
    lines = stdout.splitlines()
    assert lines[-1] == f"report: {out / 'report.md'}"
    assert lines[-2] == f"listening page: {out / 'eval' / 'report.html'}"
    page = (out / "eval" / "report.html").read_text()  # every system's clip of the first utterance
    assert all(f'listen/{name}/' in page for name in SYSTEMS) and "listen/prompt/" in page
    report = json.loads((out / "eval" / "report.json").read_text())
    assert list(report["systems"]) == SYSTEMS and report["n_seen"] + report["n_unseen"] == 6
    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.endswith("| yes |") or line.endswith("| **no** |")]
    assert len(rows) == 8 and all(row in lines for row in rows)  # the claims table, printed last but two
    for png in ("metrics.png", "gap_pca.png", "training.png"):
        assert (out / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "eval" / "samples" / "round3").glob("*.wav"))) == 1
    for t in (1, 2, 3):
        assert (out / "align" / f"round{t}" / "ar.pt").exists() and (out / "control" / f"round{t}" / "ar.pt").exists()


def test_smoke_preset_runs_end_to_end_and_a_rerun_redoes_nothing(tmp_path):
    out = tmp_path / "smoke"
    check_run(out, reproduce("--out", out).stdout)
    before = outputs(out)
    again = reproduce("--out", out)
    check_run(out, again.stdout)
    assert outputs(out) == before  # no checkpoint, pairs file or cached evaluation was rewritten
    assert "round 3: done before" in again.stdout
    runs = json.loads((out / "timings.json").read_text())  # both runs' stage times are kept
    assert len(runs) == 2 and all("DPO rounds" in r and r["total"] > 0 for r in runs)
    assert f"earlier runs into {out}: {runs[0]['total'] / 60:.1f} min" in (out / "report.md").read_text()


@pytest.mark.skipif(not (shutil.which("flite") and shutil.which("espeak-ng") and shutil.which("text2wave")),
                    reason="needs flite, espeak-ng and festival "
                           "(apt-get install flite espeak-ng festival festvox-kdlpc16k)")
def test_smoke_preset_from_scratch(tmp_path):
    """Corpus synthesis, codec fit, tokenisation and pretraining, then the same pipeline on what they made."""
    out = tmp_path / "scratch"
    check_run(out, reproduce("--out", out, "--from_scratch").stdout)
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["systems"]["sft"]["checkpoint"] == f"{out}/sft/sft_ar.pt"
    assert report["codec"] != json.loads((REPO / "data/toy/codec.layout.json").read_text())["codec"]
    # the NAR also trained on the tape voices and the codec_fit voices; the AR on the training split alone
    data = out / "data"
    extra = {m: torch.load(out / "sft" / f"sft_{m}.pt", weights_only=True)["args"]["extra_train"] for m in ("ar", "nar")}
    assert extra == {"ar": None, "nar": [str(data / "train_tape.pt"), str(data / "codec_fit.pt")]}
    assert {s.split("@")[1] for s in load_corpus(data / "train_tape.pt")["speakers"]} == set(TAPE)


def test_the_rounds_are_those_the_preset_asks_speechalign_for(tmp_path, monkeypatch, capsys):
    """A preset with --rounds 2 scores and checks round 1 and round 2, and the control after 2 rounds (the count
    came from AlignArgs' default, 3, whatever the preset said). The stages are not run: a stand-in for schedule
    notes them and writes the report they would leave."""
    import reproduce
    smoke = reproduce.PRESETS["smoke"]
    monkeypatch.setitem(reproduce.PRESETS, "two", smoke | {"align": [*smoke["align"], "--rounds", "2"]})
    out = tmp_path / "two"
    monkeypatch.setattr(sys, "argv", ["reproduce.py", "--preset", "two", "--out", str(out)])
    tasks = {}

    def schedule(ts, timings):
        tasks.update((name, cmd) for name, cmd, _ in ts)
        none = (0.0, (-1.0, 1.0))
        keys = [("sft_vs_golden_l1_nar", "delta_wer"), ("round1_vs_sft", "delta_wer"),
                ("round2_vs_round1", "delta_wer"), ("control_vs_round2", "delta_wer")]
        keys += [("round2_vs_sft", m) for m in ("rel_wer", "delta_sim", "delta_acc")]
        report = as_report({k: none for k in keys})
        (out / "eval").mkdir()
        (out / "eval" / "report.json").write_text(json.dumps(report))
        (out / "eval" / "report.md").write_text("# Evaluation report\n\n| system |\n\nthe rest\n")

    monkeypatch.setattr(reproduce, "schedule", schedule)
    reproduce.main()
    ev = tasks["eval"]
    assert [ev[i + 1] for i, x in enumerate(ev) if x == "--ar"] == [
        "sft=data/toy/sft_ar.pt", f"round1={out}/align/round1/ar.pt", f"round2={out}/align/round2/ar.pt",
        f"control={out}/control/round2/ar.pt"]
    assert sorted(t for t in tasks if t.startswith("score")) == [
        "score control", "score round1", "score round2"]
    printed = capsys.readouterr().out
    assert "| gains accumulate: round 2 beats round 1" in printed and "WER control − round2" in printed
    assert "round3" not in printed


def test_schedule_keeps_both_lanes_busy_in_dependency_order_and_stops_at_a_failure(tmp_path):
    """Tasks start as soon as a lane is free and their needs are done; a failing one stops the one running
    beside it and the run exits naming it, without starting what was still waiting."""
    from reproduce import schedule
    log = tmp_path / "log"

    def task(name, seconds, needs=(), code=0):  # a stage that notes when it starts and ends
        note = f"open({str(log)!r}, 'a').write"
        return (name, ["-c", f"import sys, time; {note}('start_{name} '); time.sleep({seconds}); "
                             f"{note}('end_{name} '); sys.exit({code})"], list(needs))
    timings = {}
    schedule([task("a", 3), task("b", 0.1), task("c", 0.1, ["b"]), task("d", 0.1, ["a", "c"])], timings)
    ev = log.read_text().split()
    assert len(ev) == 8 and set(timings) == {"a", "b", "c", "d"}
    assert ev.index("start_b") < ev.index("end_a") and ev.index("start_c") < ev.index("end_a")  # beside a
    assert ev.index("start_d") > max(ev.index("end_a"), ev.index("end_c"))
    log.unlink()
    t0 = time.time()
    with pytest.raises(SystemExit, match=r"stage x \(exit 3\) failed"):
        schedule([task("long", 60), task("x", 0.1, code=3), task("after_x", 0.1, ["x"])], {})
    assert time.time() - t0 < 30  # "long" was stopped
    assert sorted(log.read_text().split()) == ["end_x", "start_long", "start_x"]


def passing_report():
    """Differences made by hand on which every claim holds with a little room: (key, metric) -> (value, CI)."""
    return {("sft_vs_golden_l1_nar", "delta_wer"): (0.10, (0.04, 0.16)),
            ("round1_vs_sft", "delta_wer"): (-0.08, (-0.12, -0.03)),
            ("round3_vs_round1", "delta_wer"): (-0.05, (-0.09, -0.01)),
            ("round2_vs_round1", "delta_wer"): (-0.02, (-0.05, 0.01)),
            ("round3_vs_round2", "delta_wer"): (-0.03, (-0.06, 0.015)),
            ("round3_vs_sft", "rel_wer"): (-0.18, (-0.25, -0.10)),
            ("control_vs_round3", "delta_wer"): (0.04, (0.01, 0.08)),
            ("round3_vs_sft", "delta_sim"): (0.002, (-0.004, 0.008)),
            ("round3_vs_sft", "delta_acc"): (-0.06, (-0.10, -0.02))}


def as_report(d):
    pairwise = {}
    for (key, metric), (v, ci) in d.items():
        pairwise.setdefault(key, {}).update({metric: v, f"{metric}_ci": list(ci)})
    accs = {"sft": 0.70, "round1": 0.68, "round2": 0.66, "round3": 0.64}
    return {"systems": {n: {"gap": {"classifier_acc": a}} for n, a in accs.items()}, "pairwise": pairwise}


def test_claims_pass_a_report_that_meets_every_rule_and_fail_exactly_the_rule_broken():
    table, rows = claims(as_report(passing_report()), 3)
    assert [ok for _, _, ok in rows] == [True] * 8 and len(table) == 10
    assert rows[3][1] == "WER round2 − round1 -0.020 [-0.050, +0.010]; WER round3 − round2 -0.030 [-0.060, +0.015]"
    assert rows[7][1].startswith("accuracy 0.700 → 0.680 → 0.660 → 0.640; round3 − sft -0.060")
    # each rule broken at its margin: an interval end on the boundary breaks it
    broken = [(0, ("sft_vs_golden_l1_nar", "delta_wer"), (0.05, (0.0, 0.1))),
              (1, ("round1_vs_sft", "delta_wer"), (-0.03, (-0.07, 0.001))),
              (2, ("round3_vs_round1", "delta_wer"), (-0.02, (-0.05, 0.0))),
              (3, ("round2_vs_round1", "delta_wer"), (-0.01, (-0.04, 0.02))),
              (3, ("round3_vs_round2", "delta_wer"), (0.01, (-0.02, 0.03))),
              (4, ("round3_vs_sft", "rel_wer"), (-0.149, (-0.2, -0.16))),  # an interval below -15% does not count
              (5, ("control_vs_round3", "delta_wer"), (0.03, (0.0, 0.07))),
              (6, ("round3_vs_sft", "delta_sim"), (0.0, (-0.005, 0.005))),
              (7, ("round3_vs_sft", "delta_acc"), (-0.03, (-0.07, 0.0)))]
    for rule, key, value in broken:
        _, rows = claims(as_report(passing_report() | {key: value}), 3)
        assert [i for i, (_, _, ok) in enumerate(rows) if not ok] == [rule], (key, value)
    # the relative gain is held on its point estimate (as the paper reports one): exactly 15% holds
    _, rows = claims(as_report(passing_report() | {("round3_vs_sft", "rel_wer"): (-0.15, (-0.3, 0.0))}), 3)
    assert rows[4][2]


def test_claims_of_a_single_round_leave_out_the_two_rules_across_rounds():
    """With --rounds 1 there is no round to accumulate over: six rules, each read on round 1."""
    d = {k: v for k, v in passing_report().items() if "round2" not in k[0] and "round3" not in k[0]}
    d |= {("round1_vs_sft", m): v for (k, m), v in passing_report().items() if k == "round3_vs_sft"}
    d[("control_vs_round1", "delta_wer")] = (0.03, (0.0, 0.07))  # on the boundary: broken
    table, rows = claims(as_report(d), 1)
    assert len(rows) == 6 and len(table) == 8 and not any("accumulate" in c or "no round" in c for c, _, _ in rows)
    assert [ok for _, _, ok in rows] == [True, True, True, False, True, True]
    assert rows[3][1] == "WER control − round1 +0.030 [+0.000, +0.070]"
    assert rows[5][1].startswith("accuracy 0.700 → 0.680; round1 − sft -0.060")


def test_more_seeds_rerun_the_rounds_and_the_control_and_check_the_claims_per_seed(tmp_path):
    out = tmp_path / "seeds"
    r = reproduce("--out", out, "--seeds", "0", "1")
    check_run(out, r.stdout)
    seed1 = out / "seed1"
    for t in (1, 2, 3):  # the other seed's own rounds and control, judged on the same list against the same sft
        assert all((seed1 / lane / f"round{t}" / "ar.pt").exists() for lane in ("align", "control"))
    reports = [json.loads((d / "eval" / "report.json").read_text()) for d in (out, seed1)]
    assert reports[0]["systems"]["sft"]["per_utterance"] == reports[1]["systems"]["sft"]["per_utterance"]
    assert reports[0]["systems"]["round1"]["checkpoint"] != reports[1]["systems"]["round1"]["checkpoint"]
    assert not (seed1 / "eval" / "cache").exists()  # scored into the one cache
    lines = r.stdout.splitlines()
    header = lines.index("| claim | seed 0 | seed 1 |")
    assert len([ln for ln in lines[header + 2:] if ln.startswith("| ")]) == 8
    assert "--seeds 0 1" in (out / "report.md").read_text()
