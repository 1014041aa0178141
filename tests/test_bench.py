"""bench/bench.py: its measuring tools checked against known answers, and each benchmark run end to end at tiny
sizes (speeds are asserted nowhere: they live in bench/). The runs are in-process, bar one through the command
line: a subprocess that imports transformers costs ~6 s on a busy 2-core machine."""
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.bench import full_head_loss, live_reference, main, peak_memory, race, train_flops
from speechalign import AR, LMConfig, lm_loss, reference_logps

REPO = Path(__file__).resolve().parents[1]
TINY = "--d_model 32 --n_layer 1 --n_head 2 --card 64 --n_text 10 --text 4 --prompt 6 --warmup 0".split()


def run(tmp_path, *argv):
    out = tmp_path / f"{argv[0]}.json"
    main([*argv, *TINY, "--out", str(out)])
    return json.loads(out.read_text())


def test_race_interleaves_in_rotating_order_after_warmup():
    calls = []
    args = type("A", (), dict(runs=3, warmup=1, device=torch.device("cpu")))
    times = race({"a": lambda: calls.append("a"), "b": lambda: (calls.append("b"), time.sleep(0.02))}, args)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert min(times["b"]) >= 0.02 > max(times["a"])  # each time is its own system's run, and all of it


def check_rows(rows, per_s, work):
    """The bench's derived figures: median_s is the median of the timed runs, per_s is work / median_s."""
    for x in rows:
        assert len(x["seconds"]) == 5 and x["median_s"] == statistics.median(x["seconds"])
        assert x[per_s] == pytest.approx(work(x) / x["median_s"])


def test_peak_memory_counts_what_is_alive_at_once():
    def fn():
        a, b = torch.ones(1_000_000), torch.ones(1_000_000)  # 4 MB each: 8 MB
        del a
        c = torch.ones(2_000_000)  # 8 MB beside b: the peak, 12 MB
        return b.sum() + c.sum()
    keep = torch.ones(3_000_000)  # allocated before: not counted
    assert peak_memory(fn, torch.device("cpu")) == pytest.approx(12e6, rel=1e-3)
    del keep


def test_train_flops_matches_a_flop_counter():
    """PaLM's count against torch's FlopCounterMode on one forward and backward (SDPA's math path, so the
    attention shows up as the matmuls the counter knows)."""
    torch.manual_seed(0)
    ar = AR(LMConfig(n_text=10, card=(64,), d_model=32, n_layer=2, n_head=2, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    b = ar.batch([([1, 2, 3], torch.randint(0, 64, (1, 5), generator=g), torch.randint(0, 64, (1, n), generator=g))
                  for n in (7, 9)])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        lm_loss(ar, b).backward()
    assert counter.get_total_flops() == pytest.approx(train_flops(ar, b), rel=0.01)


def test_live_reference_gives_the_precomputed_log_probs():
    torch.manual_seed(0)
    ref = AR(LMConfig(n_text=10, card=(64,), d_model=32, n_layer=1, n_head=2, dropout=0.0)).eval()
    g = torch.Generator().manual_seed(1)
    seq = lambda n: torch.randint(0, 64, (n,), generator=g)
    pairs = dict(texts=[[1, 2], [3, 4, 5]], prompts=[seq(4).view(1, -1), seq(3).view(1, -1)],
                 chosen=[seq(6), seq(5)], rejected=[seq(7), seq(2), seq(4)], pair_utt=[0, 1, 1],
                 hit_limit=torch.zeros(3, dtype=torch.bool))
    idx = [2, 0]  # pairs train_round may use; it indexes ref[side] by positions in idx
    pre = reference_logps(ref, pairs, idx)
    live = live_reference(ref, pairs, idx, "cpu")
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(live[side][[1, 0]], pre[side][[1, 0]])


def test_sampling_bench_smoke(tmp_path):
    pytest.importorskip("transformers")
    r = run(tmp_path, "sampling", "--new", "6", "--batches", "1,3", "--no_cache_batches", "3")
    assert [(x["system"], x["batch"]) for x in r["rows"]] == [
        ("ours, KV cache", 1), ("transformers generate", 1),
        ("ours, KV cache", 3), ("transformers generate", 3), ("ours, no cache", 3)]
    check_rows(r["rows"], "new_tokens_per_s", lambda x: x["batch"] * 6)
    speed = {(x["system"], x["batch"]): x["new_tokens_per_s"] for x in r["rows"]}
    assert r["ratios"] == pytest.approx({
        "batch 1: KV cache / transformers": speed["ours, KV cache", 1] / speed["transformers generate", 1],
        "batch 3: KV cache / transformers": speed["ours, KV cache", 3] / speed["transformers generate", 3],
        "batch 3: KV cache / no cache": speed["ours, KV cache", 3] / speed["ours, no cache", 3]})


def test_train_bench_smoke(tmp_path):
    pytest.importorskip("transformers")
    r = run(tmp_path, "train", "--batch", "2", "--target", "8")
    assert [x["system"] for x in r["rows"]] == ["ours (train_step)", "transformers GPT-2",
                                                "ours, head at every position"]
    assert all(x["tokens"] == 2 * (4 + 6 + 8) for x in r["rows"])
    check_rows(r["rows"], "tokens_per_s", lambda x: x["tokens"])
    ours, hf, full = r["rows"]
    assert r["ratios"]["ours / transformers"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
    assert r["ratios"]["ours, head at every position / transformers"] == pytest.approx(
        full["tokens_per_s"] / hf["tokens_per_s"])


def test_the_earlier_full_head_loss_is_lm_loss():
    """The bench's "before" system computes the loss lm_loss computes, by the other route (the head at every
    position, unscored ones ignored), so that the two differ in speed only."""
    torch.manual_seed(0)
    ar = AR(LMConfig(n_text=20, card=(16,), d_model=32, n_layer=1, n_head=2, max_text=16, max_audio=32)).eval()
    b = ar.batch([([1, 2, 3], torch.randint(0, 16, (1, 4)), torch.randint(0, 16, (1, 5))),
                  ([4, 5], torch.randint(0, 16, (1, 3)), torch.randint(0, 16, (1, 7)))])
    torch.testing.assert_close(full_head_loss(ar, b), lm_loss(ar, b), rtol=1e-6, atol=1e-6)


def test_dpo_bench_smoke_from_the_command_line(tmp_path):
    out = tmp_path / "dpo.json"
    subprocess.run([sys.executable, str(REPO / "bench/bench.py"), "dpo", *TINY, "--pairs", "3", "--target", "8",
                    "--out", str(out)], check=True, cwd=tmp_path, capture_output=True)
    r = json.loads(out.read_text())
    pre, live, once = r["rows"]
    for x in r["rows"]:
        assert len(x["seconds"]) == 5 and x["median_s"] == statistics.median(x["seconds"])
        assert x["ms_per_pair"] == pytest.approx(1e3 * x["median_s"] / 3)
    assert pre["peak_mb"] > 0 and live["peak_mb"] > 0 and "peak_mb" not in once  # smoke: measured at all
    # the live reference keeps a second copy of the weights: the TINY AR's, fp32 (positions: 6 + 2 * 8 frames)
    tiny = AR(LMConfig(n_text=10, card=(64,), d_model=32, n_layer=1, n_head=2, max_audio=6 + 2 * 8))
    assert pre["resident_reference_mb"] == 0
    assert live["resident_reference_mb"] == pytest.approx(4 * sum(p.numel() for p in tiny.parameters()) / 2**20)


def test_mfu_bench_needs_a_known_peak(tmp_path, capsys):
    main(["mfu", *TINY, "--batch", "2", "--target", "8", "--device", "cpu", "--out", str(tmp_path / "none.json")])
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "none.json").exists()
    r = run(tmp_path, "mfu", "--batch", "2", "--target", "8", "--device", "cpu", "--peak_tflops", "1")
    (x,) = r["rows"]
    assert x["mfu"] == pytest.approx(x["tflops_per_step"] / x["median_s"] / 1)
