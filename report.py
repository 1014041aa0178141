"""The evaluation's run directory, from its numbers (eval.py measures them): report.json, report.md,
PNG plots, WAV samples and report.html, the listening page.

    write_report(out, report, codec, samples, gap_features, checkpoints, page_clips)
"""
import glob
import html
import json
import os
import re
from urllib.parse import quote

import numpy as np

from codec import atomic_write, decode_codes, write_text, write_wav


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def save_fig(fig, path):
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    pyplot().close(fig)


def plot_metrics(path, S, chance):
    """WER and SIM to prompt per system, with their 95% intervals."""
    fig, axes = pyplot().subplots(1, 2, figsize=(4 + 1.2 * len(S), 4))
    for ax, key, title in zip(axes, ("wer", "sim"), ("WER (lower is better)", "SIM to prompt (higher is better)")):
        v = np.array([s[key] for s in S.values()])
        ci = np.array([s[f"{key}_ci"] for s in S.values()]).T
        ax.bar(list(S), v, yerr=np.abs(ci - v), capsize=4, color="tab:blue")
        ax.set_title(f"{title}, 95% CI", fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
    axes[0].axhline(chance["wer"], ls="--", color="gray", label="chance (wrong sentence)")
    axes[0].legend(fontsize=8)
    save_fig(fig, path)


def plot_gap(path, groups):
    """2-D PCA of the layer-1 features (eval.layer1_features, one row per sequence) of golden and each
    system's synthetic sequences, standardised."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    P = PCA(2).fit_transform(StandardScaler().fit_transform(np.concatenate(list(groups.values()))))
    fig, ax = pyplot().subplots(figsize=(5.5, 4.5))
    start = 0
    for name, X in groups.items():
        ax.scatter(*P[start:start + len(X)].T, s=10, alpha=0.6, label=name)
        start += len(X)
    ax.set_title("layer-1 sequences: unigram/bigram features, PCA", fontsize=9)
    ax.legend(fontsize=8)
    save_fig(fig, path)


def plot_training(path, checkpoints):
    """Training (and validation) loss from the *log.jsonl files beside the checkpoints, if there are any."""
    logs = sorted({p for c in checkpoints for p in glob.glob(os.path.join(os.path.dirname(c) or ".", "*log.jsonl"))})
    if not logs:
        return
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for p in logs:
        with open(p) as f:  # a log still being written may end in half a line
            recs = [json.loads(line) for line in f if line.endswith("\n")]
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        if train:
            name = os.path.join(*p.split(os.sep)[-2:])  # e.g. sft/ar.pt.log.jsonl, round1/log.jsonl
            (line,) = ax.plot(*zip(*train), lw=0.7, alpha=0.7, label=name)
            if val:
                ax.plot(*zip(*val), "o-", color=line.get_color(), label=f"{name} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    save_fig(fig, path)


def plot_curve(path, curve):
    fig, ax = pyplot().subplots(figsize=(6, 4))
    wer, ci = np.array(curve["wer"]), np.array(curve["wer_ci"]).T
    ax.errorbar(curve["steps"], wer, yerr=np.abs(ci - wer), marker="o", capsize=3, label="AR snapshot + NAR")
    for key, label, style in (("golden", "golden resynthesis", ":"), ("golden_l1", "golden layer 1 alone", (0, (1, 3))),
                              ("golden_l1_nar", "golden layer 1 + NAR", "--"), ("chance", "chance", "-.")):
        if f"{key}_wer" in curve:  # (golden_l1: unless --no-golden_l1)
            ax.axhline(curve[f"{key}_wer"], ls=style, color="gray", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("test WER")
    ax.legend(fontsize=8)
    save_fig(fig, path)


def safe_name(utt_id):
    """An utterance id as a file name."""
    return re.sub(r"[^\w.-]", "_", utt_id)


VOCODER_NAMES = {"griffin_lim": "Griffin-Lim", "source_filter": "the source-filter decoder at each prompt's pitch"}


def write_samples(out, codec, samples, ids):
    """out/samples/<system>/<utterance id>.wav for the codes each system's result keeps ("samples", and its
    "samples_upper" with --nar_decoding expected, and "samples_f0" with --vocoder source_filter); one that did not
    decode is left out (the report lists it)."""
    safe = [safe_name(i) for i in ids]
    for name, res in samples.items():
        undecodable = {f["utt"] for f in res["failures"] if f["stage"] == "decode"}
        uppers = res.get("samples_upper", [None] * len(res["samples"]))
        f0s = res.get("samples_f0", [None] * len(res["samples"]))
        for k, (codes, upper, f0) in enumerate(zip(res["samples"], uppers, f0s)):
            if k not in undecodable:
                write_wav(os.path.join(out, "samples", name, f"{safe[k]}.wav"), *decode_codes(codec, codes, upper, f0))


def fmt(x, spec=".3f", ci=None):
    if x is None:
        return "–"
    return f"{x:{spec}}" + ("" if ci is None else f" [{ci[0]:{spec}}, {ci[1]:{spec}}]")


def markdown(r):
    """report.md: the results table first, then the setup, the distribution gap, the differences and the
    utterances the judges could not score."""
    S, n = r["systems"], r["n_seen"] + r["n_unseen"]

    def missing(k, what):
        return f" ({k} {what})" if k else ""

    table = ["| system | WER [95% CI] | SIM to prompt [95% CI] | SIM to golden | WER seen / unseen |",
             "|---|---|---|---|---|"]
    table += [f"| {name} | {fmt(s['wer'], ci=s['wer_ci'])}{missing(s['no_transcript'], 'not transcribed')} | "
              f"{fmt(s['sim'], ci=s['sim_ci'])}{missing(s['sim_missing'], 'missing')} | "
              f"{fmt(s['sim_to_golden'])} | {fmt(s['wer_by_split'].get('seen'))} / "
              f"{fmt(s['wer_by_split'].get('unseen'))} |" for name, s in S.items()]
    table.append(f"| chance | {fmt(r['chance']['wer'], ci=r['chance']['wer_ci'])} | – | – | – |")
    lines = ["# Evaluation report", "", *table, "", "## Setup", "",
             f"- Test list: {n} utterances ({r['n_seen']} of test_seen, {r['n_unseen']} of test_unseen), each with a "
             f"{r['prompt_seconds']:g} s prompt from another utterance of the same speaker; seed {r['seed']}.",
             *([f"- Skipped, longer than the models' positions (text, or prompt + target + EOS): "
                f"{len(r['skipped'])} utterances: " + ", ".join(f"{x['id']} ({x['reason']})" for x in r["skipped"])]
               if r["skipped"] else []),
             f"- WER: {r['wer_kind']}; ASR: {r['asr']}. Normalisation: {r['normalization']}",
             f"- SIM: {r['sim_kind']}.",
             "- An utterance the judges cannot score (its codes do not decode, or the ASR or the speaker encoder fails "
             "on it) counts as all deletions in WER and is left out of SIM (and counted); the list is at the end.",
             "- `golden`: codec resynthesis of all golden layers (upper bound); "
             f"{'`golden_l1`: golden layer 1 alone; ' if 'golden_l1' in r['systems'] else ''}"
             "`golden_l1_nar`: golden layer 1 + the NAR; `chance`: golden transcripts scored against other "
             "utterances' sentences.",
             f"- Codec: {r['codec']}, decoded by {VOCODER_NAMES.get(r['vocoder'], r['vocoder'])}. NAR: {r['nar']}, its "
             f"upper layers decoded from its {r['nar_decoding']} "
             f"{'codes' if r['nar_decoding'] == 'argmax' else 'codebook vectors'}. AR sampling (KV cache): "
             f"{r['sampling']}.",
             f"- Intervals: 95% percentile bootstrap over utterances, {r['n_boot']} resamples, paired across systems.",
             "", "## Distribution gap: the NAR fed golden vs the AR's synthetic layer 1", "",
             "| system | WER golden L1 → AR's L1 | SIM golden L1 → AR's L1 | golden-vs-synthetic classifier acc "
             "(0.5: no gap) | golden NLL (nats/token) | hit length limit |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {fmt(g['wer_golden_ar'])} → {fmt(g['wer_synthetic_ar'])} | {fmt(g['sim_golden_ar'])} → "
              f"{fmt(g['sim_synthetic_ar'])} | {fmt(g['classifier_acc'], '.2f', g['classifier_acc_ci'])} | "
              f"{fmt(s['golden_nll'])} | "
              f"{s['hit_limit_rate']:.1%} |" for name, s in S.items() if (g := s["gap"])]
    by_split = list(next(iter(r["pairwise"].values()), {}).get("delta_wer_by_split", {}))  # both splits judged
    lines += ["", "## Differences (A_vs_B = A minus B)", "",
              "| pair | ΔWER [95% CI] | ΔSIM [95% CI] |" + "".join(f" ΔWER {sp} [95% CI] |" for sp in by_split),
              "|---|---|---|" + "---|" * len(by_split)]
    lines += [f"| {k} | {fmt(d['delta_wer'], '+.3f', d['delta_wer_ci'])} | "
              f"{fmt(d['delta_sim'], '+.3f', d['delta_sim_ci'])} |"
              + "".join(f" {fmt(d['delta_wer_by_split'][sp][0], '+.3f', d['delta_wer_by_split'][sp][1])} |"
                        for sp in by_split) for k, d in r["pairwise"].items()]
    unscored = [("prompt", u) for u in r["prompt_unscored"]] + [(nm, u) for nm, s in S.items() for u in s["unscored"]]
    rows = [f"| {nm} | {u['id']} | {u['stage']} | {' '.join(u['reason'].replace('|', '/').split())} |"
            for nm, u in unscored]  # a reason is one table cell: no pipes, no line breaks
    lines += ["", "## Utterances the judges could not score", "",
              *(["| system | utterance | stage | reason |", "|---|---|---|---|", *rows] if rows else ["None."])]
    return "\n".join(lines) + "\n", table


# ---------------------------------------------------------------------------------------------------------
# report.html, the listening page: one folder that opens from the file system (inline CSS, relative links to
# the plots and to its WAVs under listen/, no script, nothing fetched from a network)

CSS = """body{font:14px/1.4 system-ui,sans-serif;max-width:1280px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:2px 6px;text-align:left}
th{background:#eee}td{vertical-align:middle}audio{height:30px;width:250px;vertical-align:middle}
.utt{border-top:2px solid #888;margin-top:1.5em}.text{font-size:1.15em}img{max-width:100%}
code{background:#f4f4f4}"""

PLOTS = ("metrics.png", "gap_pca.png", "training.png", "curve.png")


def page_clips(results, ids, prompts, golden, page):
    """{system: {utterance id: (codes, upper part)}} for the listening page: the prompt and golden clips
    from the test list, a generated system's from its cache entry (its first n_samples clips and, where
    the entry kept them, the page's)."""
    def kept(res):
        codes = dict(zip(ids, res["samples"])) | res.get("page", {})
        upper = dict(zip(ids, res.get("samples_upper", []))) | res.get("page_upper", {})
        return {i: (c, upper.get(i)) for i, c in codes.items()}

    layers = {"golden": None, "golden_l1": 1}  # the golden systems' clips: the test list's codes, cut
    return {"prompt": {ids[i]: (prompts[i], None) for i in page},
            **{n: {ids[i]: (golden[i][:layers[n]], None) for i in page} if n in layers else kept(r)
               for n, r in results.items()}}


def page_utterances(splits, per_split=6):
    """The listening page's utterances, as indices into the test list: the first per_split of each split (seen,
    then unseen speakers), so that every run on one test list plays the same sentences."""
    return [i for sp in ("seen", "unseen") for i in [k for k, s in enumerate(splits) if s == sp][:per_split]]


def md_html(md):
    """HTML blocks of the Markdown `markdown` writes: headings, tables, bullet lists and paragraphs, separated by
    blank lines, with `code` and **bold** inside."""
    def inline(text):
        text = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)

    def row(line, tag):  # the reasons in the tables have their pipes replaced: every inner | separates cells
        cells = line.strip()[1:-1].split("|")  # an empty first or last cell stays a cell
        return "<tr>" + "".join(f"<{tag}>{inline(c.strip())}</{tag}>" for c in cells) + "</tr>"

    blocks = []
    for block in md.strip().split("\n\n"):
        lines = block.splitlines()
        if lines[0].startswith("#"):
            level = len(lines[0]) - len(lines[0].lstrip("#"))
            blocks.append(f"<h{level}>{inline(lines[0][level:].strip())}</h{level}>")
        elif lines[0].startswith("|"):  # a header row, the |---| row, the body
            blocks.append("<table>" + row(lines[0], "th") + "".join(row(x, "td") for x in lines[2:]) + "</table>")
        elif lines[0].startswith("- "):
            blocks.append("<ul>" + "".join(f"<li>{inline(x[2:])}</li>" for x in lines) + "</ul>")
        else:
            blocks.append(f"<p>{inline(' '.join(lines))}</p>")
    return blocks


def write_page(out, report, codec, clips, md):
    """out/report.html and its WAVs under out/listen/: report.md's tables (md), the plots, and for each of the
    page_utterances its text, its prompt and one player per system with that system's transcript, WER and SIM
    of the utterance. clips: for "prompt" and each system, {utterance id: (codes, upper part or None[, f0])}; a clip
    that is not there (a system scored before the page existed) or that did not decode is shown as such."""
    S, test = report["systems"], report["test"]
    undecodable = {(nm, u["id"]) for nm, s in S.items() for u in s["unscored"] if u["stage"] == "decode"}
    undecodable |= {("prompt", u["id"]) for u in report["prompt_unscored"] if u["stage"] == "decode"}

    def player(name, utt):
        if (name, utt) in undecodable:
            return "<i>did not decode</i>"
        if utt not in clips.get(name, {}):
            return "<i>not kept (scored before the page existed)</i>"
        rel = f"listen/{name}/{safe_name(utt)}.wav"
        write_wav(os.path.join(out, rel), *decode_codes(codec, *clips[name][utt]))
        return f'<audio controls preload="metadata" src="{quote(rel)}"></audio>'

    utts = []
    for k in page_utterances([t["split"] for t in test]):
        t = test[k]
        utts += [f'<div class="utt"><h3>{html.escape(t["id"])} ({t["split"]} speaker)</h3>',
                 f'<p class="text">{html.escape(t["ref"])}</p><p>prompt: {player("prompt", t["id"])}</p>',
                 "<table><tr><th>system</th><th>listen</th><th>transcript</th><th>WER</th><th>SIM</th></tr>"]
        for name, s in S.items():
            u = s["per_utterance"][k]
            hyp = "<i>none</i>" if u["hyp"] is None else html.escape(u["hyp"])
            wer = u["errors"] / t["ref_words"] if t["ref_words"] else None
            utts.append(f"<tr><td>{name}</td><td>{player(name, t['id'])}</td><td>{hyp}</td>"
                        f"<td>{fmt(wer, '.2f')}</td><td>{fmt(u['sim'], '.2f')}</td></tr>")
        utts.append("</table></div>")
    blocks = md_html(md)
    plots = [f'<p><img src="{p}" alt="{p}"></p>' for p in PLOTS if os.path.exists(os.path.join(out, p))]
    body = [blocks[0], '<p><a href="#listen">listen</a> · <a href="#plots">plots</a> · '
            '<a href="#details">setup, the gap, the differences</a> · <a href="report.md">report.md</a></p>',
            blocks[1], '<h2 id="listen">Listen</h2>',
            "<p>The first utterances of each split of the test list. Each system's clip is the sample its numbers "
            "were measured on: its transcript by the ASR, its WER on this utterance and its SIM to the prompt "
            "(the prompt as the codec hears it).</p>",
            *utts, '<h2 id="plots">Plots</h2>', *plots, '<div id="details">', *blocks[2:], "</div>"]
    write_text(os.path.join(out, "report.html"), "\n".join(
        ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
         f"<title>Evaluation report: {report['codec']}</title><style>{CSS}</style></head><body>",
         *body, "</body></html>"]) + "\n")


def write_report(out, report, codec, samples, gap_features, checkpoints, page, curve_names=()):
    """Everything in the run directory `out` but the cache; returns the results table (Markdown lines).
    samples: per system (and "prompt") its result with the codes of its sample utterances (write_samples);
    gap_features: per system its layer-1 feature rows (plot_gap); checkpoints: whose training logs to plot;
    page: the listening page's clips (write_page);
    curve_names: the systems that are snapshots of one training run, in step order (curve.json, curve.png)."""
    S, chance = report["systems"], report["chance"]
    write_text(os.path.join(out, "report.json"), json.dumps(report, indent=1))
    plot_metrics(os.path.join(out, "metrics.png"), S, chance)
    plot_gap(os.path.join(out, "gap_pca.png"), gap_features)
    plot_training(os.path.join(out, "training.png"), checkpoints)
    if curve_names:
        curve = dict(steps=[S[n]["step"] for n in curve_names], checkpoints=[S[n]["checkpoint"] for n in curve_names],
                     **{k: [S[n][k] for n in curve_names] for k in ("wer", "wer_ci", "sim", "sim_ci")},
                     **{f"{n}_wer": S[n]["wer"] for n in ("golden", "golden_l1", "golden_l1_nar") if n in S},
                     chance_wer=chance["wer"])
        write_text(os.path.join(out, "curve.json"), json.dumps(curve, indent=1))
        plot_curve(os.path.join(out, "curve.png"), curve)
    write_samples(out, codec, samples, [t["id"] for t in report["test"]])
    md, table = markdown(report)
    write_text(os.path.join(out, "report.md"), md)
    write_page(out, report, codec, page, md)
    return table
