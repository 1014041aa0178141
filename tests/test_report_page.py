"""Tests of report.html, the listening page (report.write_page), on hand-made numbers and a fake codec: which
utterances it plays, what each row says, and that headless Chromium renders it from the file system with every
audio file it names present and decodable. (tests/test_eval.py checks that an evaluation writes it.)
"""
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import matplotlib.image
import numpy as np
import pytest
import soundfile as sf
import torch

from report import markdown, md_html, page_utterances, write_page

SYSTEMS = ("golden", "golden_l1", "golden_l1_nar", "sft", "round1", "control")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class ToneCodec:
    """Decodes a code matrix to a tone of 320 samples per frame whose pitch follows its first code."""
    name = "tone"

    def decode(self, codes, upper=None):
        t = torch.arange(codes.shape[1] * 320)
        return 0.3 * torch.sin(t * (0.02 + codes[0, 0].item() / 1e4)), 16000


def fake_report(splits):
    """A report as eval.py writes it, every number made up: utterance k has k + 2 reference words and system j
    makes j errors on it (hand WER j / (k + 2)); round1 has no transcript of utterance 1, and utterance 2 did not
    decode as sft."""
    n = len(splits)
    test = [dict(id=f"spk{k % 3}/utt {k}", split=sp, ref=f"sentence {k} <&> " + "w " * (k - 1), ref_words=k + 2)
            for k, sp in enumerate(splits)]
    systems = {}
    for j, name in enumerate(SYSTEMS):
        per = [dict(hyp=f"heard {name} {k}", errors=j, sim=0.5 + j / 100, sim_to_golden=0.9) for k in range(n)]
        unscored = []
        if name == "round1":
            per[1]["hyp"] = None
            unscored.append(dict(id=test[1]["id"], stage="asr", reason="RuntimeError: x | y"))
        if name == "sft":
            per[2].update(hyp=None, sim=None)
            unscored.append(dict(id=test[2]["id"], stage="decode", reason="ValueError: one frame"))
        gap = None if name.startswith("golden") else dict(
            wer_golden_ar=0.5, wer_synthetic_ar=0.6, sim_golden_ar=0.8, sim_synthetic_ar=0.79, classifier_acc=0.7,
            classifier_acc_ci=[0.6, 0.8])
        systems[name] = dict(wer=0.1 * j, wer_ci=[0.1 * j - 0.05, 0.1 * j + 0.05], sim=0.8, sim_ci=[0.7, 0.9],
                             no_transcript=0, sim_missing=0, sim_to_golden=0.9, wer_by_split={"seen": 0.1},
                             gap=gap, golden_nll=None if gap is None else 4.2, hit_limit_rate=0.0,
                             unscored=unscored, per_utterance=per)
    return dict(systems=systems, chance=dict(wer=1.1, wer_ci=[1.0, 1.2]), n_seen=splits.count("seen"),
                n_unseen=splits.count("unseen"), prompt_seconds=3.0, seed=0, skipped=[], wer_kind="corpus",
                asr="fake", normalization="none", sim_kind="fake", codec="tone", vocoder="griffin_lim", nar="nar.pt",
                nar_decoding="argmax",
                sampling={}, n_boot=10, prompt_unscored=[], test=test,
                pairwise={"sft_vs_golden": dict(delta_wer=0.3, delta_wer_ci=[0.2, 0.4], delta_sim=0.0,
                                                delta_sim_ci=[-0.1, 0.1])})


def build(out, splits, missing=()):
    """The page of fake_report(splits) in out, with clips for the page's utterances but those in `missing`
    ((system, utterance index): not kept in the cache); returns the report."""
    report = fake_report(splits)
    ids = [t["id"] for t in report["test"]]
    clips = {name: {ids[k]: (torch.full((2, 10 + k), j), None) for k in page_utterances(splits)
                    if (name, k) not in missing} for j, name in enumerate(("prompt",) + SYSTEMS)}
    write_page(str(out), report, ToneCodec(), clips, markdown(report)[0])
    return report


class Page(HTMLParser):
    """The page's audio sources, the text of its <h3> headings, and its tables: lists of rows of cell texts (a
    player is the cell text "<audio>")."""

    def __init__(self, text):
        super().__init__()
        self.audio, self.h3, self.tables, self._in = [], [], [], None
        self.feed(text)
        self.rows = [r for t in self.tables for r in t]

    def handle_starttag(self, tag, attrs):
        if tag == "audio":
            self.audio.append(unquote(dict(attrs)["src"]))
            if self._in == "td":
                self.tables[-1][-1][-1] += "<audio>"
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
            self._in = "td"
        elif tag == "h3":
            self.h3.append("")
            self._in = "h3"

    def handle_endtag(self, tag):
        if tag in ("td", "th", "h3"):
            self._in = None

    def handle_data(self, data):
        if self._in == "td":
            self.tables[-1][-1][-1] += data
        elif self._in == "h3":
            self.h3[-1] += data


def test_page_utterances_are_the_first_six_of_each_split():
    splits = ["seen", "unseen"] * 3 + ["seen"] * 8 + ["unseen"] * 5
    assert page_utterances(splits) == [0, 2, 4, 6, 7, 8, 1, 3, 5, 14, 15, 16]
    assert page_utterances(["seen"] * 4 + ["unseen"] * 2) == [0, 1, 2, 3, 4, 5]  # fewer: all of them
    assert page_utterances(["unseen"] * 8) == list(range(6))


def test_each_row_holds_its_systems_clip_transcript_and_wer(tmp_path):
    splits = ["seen"] * 8 + ["unseen"] * 7
    page = page_utterances(splits)
    report = build(tmp_path, splits, missing={("control", 3)})
    text = (tmp_path / "report.html").read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", text)  # nothing from a network
    p = Page(text)
    assert p.h3 == [f"{report['test'][k]['id']} ({splits[k]} speaker)" for k in page]
    assert "sentence 0 &lt;&amp;&gt;" in text  # the text, escaped
    rows = [r for t in p.tables if t[0] == ["system", "listen", "transcript", "WER", "SIM"] for r in t[1:]]
    assert len(rows) == len(page) * len(SYSTEMS)
    for n, row in enumerate(rows):
        k, j = page[n // len(SYSTEMS)], n % len(SYSTEMS)
        name = SYSTEMS[j]
        assert row[0] == name
        hyp = "none" if (name, k) in {("round1", 1), ("sft", 2)} else f"heard {name} {k}"
        assert row[2] == hyp, (name, k)
        assert row[3] == f"{j / (k + 2):.2f}"  # errors / reference words, by hand
        assert row[4] == ("–" if (name, k) == ("sft", 2) else f"{0.5 + j / 100:.2f}")
        player = {("sft", 2): "did not decode", ("control", 3): "not kept (scored before the page existed)"}
        assert row[1] == player.get((name, k), "<audio>"), (name, k)
    ids = [report["test"][k]["id"] for k in page]
    safe = [i.replace("/", "_").replace(" ", "_") for i in ids]
    expected = [f"listen/prompt/{safe[n]}.wav" for n in range(len(page))]
    assert sorted(a for a in p.audio if a.startswith("listen/prompt/")) == sorted(expected)
    assert len(p.audio) == len(page) * (1 + len(SYSTEMS)) - 2
    for a in p.audio:  # each clip is its own codes decoded: the tone's length says which utterance it is
        k = page[safe.index(Path(a).stem)]
        wav, sr = sf.read(tmp_path / a)
        assert sr == 16000 and len(wav) == (10 + k) * 320, a
    # the tables of report.md come along: the results (chance included) and the differences
    assert ["chance", "1.100 [1.000, 1.200]", "–", "–", "–"] in p.rows
    assert ["sft_vs_golden", "+0.300 [+0.200, +0.400]", "+0.000 [-0.100, +0.100]"] in p.rows
    assert ["round1", "spk1/utt 1", "asr", "RuntimeError: x / y"] in p.rows


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_chromium_renders_the_page_from_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.png", "gap_pca.png"):  # plots, as write_report leaves them beside the page
        matplotlib.image.imsave(out / name, np.random.default_rng(0).random((40, 60)))
    build(out, ["seen"] * 7 + ["unseen"] * 6)
    url = (out / "report.html").as_uri()
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
               "--window-size=1200,1600"]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    p = Page(dom.stdout)
    assert len(p.h3) == 12 and len(p.audio) == 12 * (1 + len(SYSTEMS)) - 1  # one sft clip did not decode
    assert any(r[:2] == ["system", "WER [95% CI]"] for r in p.rows)  # the results table
    assert '<img src="metrics.png"' in dom.stdout and '<img src="gap_pca.png"' in dom.stdout
    for a in p.audio:
        wav, sr = sf.read(out / a)  # exists and decodes
        assert sr == 16000 and len(wav) > 0, a
    shot = tmp_path / "shot.png"
    r = subprocess.run([*browser, f"--screenshot={shot}", url], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    img = matplotlib.image.imread(shot)[..., :3]
    background = (img == img[0, 0]).all(axis=-1)
    assert img.shape[:2] == (1600, 1200) and 0.01 < 1 - background.mean() < 0.9  # text and players, on white


def test_markdown_tables_keep_empty_cells():
    (table,) = md_html("| a | b | c |\n|---|---|---|\n|  | `x` **y** |  |")
    assert table == ("<table><tr><th>a</th><th>b</th><th>c</th></tr>"
                     "<tr><td></td><td><code>x</code> <b>y</b></td><td></td></tr></table>")
