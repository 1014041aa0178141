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

from reproduce import claims

REPO = Path(__file__).resolve().parents[1]
ENV = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
SYSTEMS = ["golden", "golden_l1", "golden_l1_nar", "sft", "round1", "round2", "round3", "control_round1", "control"]


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
    assert len(rows) == 7 and all(row in lines for row in rows)  # the claims table, printed last but two
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
        keys = ["sft_vs_golden_l1_nar", "round1_vs_sft", "round2_vs_round1", "control_vs_round2",
                "control_round1_vs_round1", "round2_vs_sft"]
        report = fake_report({k: (none, none) for k in keys}, {"sft": 0.7, "round1": 0.6, "round2": 0.5})
        (out / "eval").mkdir()
        (out / "eval" / "report.json").write_text(json.dumps(report))
        (out / "eval" / "report.md").write_text("# Evaluation report\n\n| system |\n\nthe rest\n")

    monkeypatch.setattr(reproduce, "schedule", schedule)
    reproduce.main()
    ev = tasks["eval"]
    assert [ev[i + 1] for i, x in enumerate(ev) if x == "--ar"] == [
        "sft=data/toy/sft_ar.pt", f"round1={out}/align/round1/ar.pt", f"round2={out}/align/round2/ar.pt",
        f"control_round1={out}/control/round1/ar.pt", f"control={out}/control/round2/ar.pt"]
    assert sorted(t for t in tasks if t.startswith("score")) == [
        "score control", "score control_round1", "score round1", "score round2"]
    printed = capsys.readouterr().out
    assert "| round 2 is no worse than round 1" in printed and "WER control - round2" in printed
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


def fake_report(deltas, accs):
    """A report with the given pairwise (delta, ci) of WER and SIM and classifier accuracies."""
    pairwise = {k: {"delta_wer": w[0], "delta_wer_ci": w[1], "delta_sim": s[0], "delta_sim_ci": s[1]}
                for k, (w, s) in deltas.items()}
    systems = {n: {"gap": {"classifier_acc": a, "classifier_acc_ci": [a - 0.05, a + 0.05]}} for n, a in accs.items()}
    return {"systems": systems, "pairwise": pairwise}


def test_claims_read_the_right_differences_and_ends_of_the_intervals():
    none = (0.0, (-1.0, 1.0))
    deltas = {"sft_vs_golden_l1_nar": ((0.2, (0.1, 0.3)), none),
              "round1_vs_sft": ((-0.1, (-0.2, -0.01)), none),
              "round3_vs_round1": ((0.05, (-0.01, 0.1)), none),  # not measurably worse: held
              "control_vs_round3": ((0.04, (-0.02, 0.1)), none),  # the control is not measurably worse: not held
              "control_round1_vs_round1": ((0.07, (0.02, 0.12)), none),  # after one round it is: held
              "round3_vs_sft": (none, (-0.03, (-0.05, -0.01)))}  # SIM measurably lower: not held
    _, rows = claims(fake_report(deltas, {"sft": 0.7, "round1": 0.65, "round2": 0.66, "round3": 0.6}), 3)
    assert [ok for _, _, ok in rows] == [True, True, True, False, True, False, False]  # 0.65 -> 0.66 is no fall
    deltas["control_vs_round3"] = ((0.1, (0.01, 0.2)), none)
    deltas["round3_vs_sft"] = (none, (-0.01, (-0.03, 0.0)))
    deltas["round3_vs_round1"] = ((0.08, (0.01, 0.15)), none)
    _, rows = claims(fake_report(deltas, {"sft": 0.7, "round1": 0.65, "round2": 0.62, "round3": 0.6}), 3)
    assert [ok for _, _, ok in rows] == [True, True, False, True, True, True, True]
    assert "+0.080 [+0.010, +0.150]" in rows[2][1]
    assert "0.620 [0.570, 0.670] → 0.600 [0.550, 0.650]" in rows[6][1]
