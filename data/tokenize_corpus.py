"""Tokenise a JSONL manifest with a codec into one corpus file (format: codec.py, "tokenised corpora").

    python data/tokenize_corpus.py data/toy_corpus/test_seen.jsonl data/toy/test_seen.pt --codec data/toy/codec.pt
    python data/tokenize_corpus.py libritts/train.jsonl libritts/train.pt --codec encodec

Manifest lines: {"id", "audio", "text", "speaker"} and optionally "phonemes"; `audio` is a path relative to
the manifest's folder (or absolute). The whole manifest is checked before any audio is read, so a bad line
(not JSON, a missing or empty field, a duplicate id) stops the run at once with file:line. Audio that cannot
be read, is empty, or is longer than --max_seconds is skipped, counted and listed in the output file.
"""
import argparse
import json
import os
import sys

import soundfile as sf
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from codec import load_codec, save_corpus  # noqa: E402

REQUIRED = ("id", "audio", "text", "speaker")


def read_manifest(path):
    """Parse and check every line; raises ValueError naming path:line for the first bad one."""
    rows, ids = [], set()
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            for key in REQUIRED:
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ValueError(f"{path}:{n}: field {key!r} is missing or empty")
            if row["id"] in ids:
                raise ValueError(f"{path}:{n}: duplicate id {row['id']!r}")
            ids.add(row["id"])
            row["line"] = n
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no utterances")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest")
    ap.add_argument("out")
    ap.add_argument("--codec", required=True, help="'encodec' or the path of a fitted toy codec")
    ap.add_argument("--max_seconds", type=float, default=20.0)
    ap.add_argument("--limit", type=int, default=None, help="keep only the first N utterances")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small per-utterance work: one thread is fastest here

    rows = read_manifest(args.manifest)[: args.limit]
    codec = load_codec(args.codec)
    root = os.path.dirname(os.path.abspath(args.manifest))
    kept, codes, skipped = [], [], []
    for row in tqdm(rows, desc=f"tokenise {os.path.basename(args.manifest)}"):
        path = os.path.join(root, row["audio"])
        try:
            wav, sr = sf.read(path, dtype="float32", always_2d=True)
        except Exception as e:  # missing file, not audio, truncated...
            skipped.append({"line": row["line"], "id": row["id"], "reason": f"unreadable {path}: {e}"})
            continue
        seconds = wav.shape[0] / sr
        if wav.shape[0] == 0 or not (wav != 0).any():
            reason = f"empty or silent audio {path}"
        elif seconds > args.max_seconds:
            reason = f"too long: {seconds:.1f} s > --max_seconds {args.max_seconds:g} ({path})"
        else:
            codes.append(codec.encode(torch.from_numpy(wav.T.copy()), sr))
            kept.append(row)
            continue
        skipped.append({"line": row["line"], "id": row["id"], "reason": reason})

    if not kept:
        raise SystemExit(f"{args.manifest}: every utterance was skipped, nothing written; first reason: "
                         f"{skipped[0]['reason']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_corpus(args.out, codec, kept, codes, source=args.manifest, skipped=skipped)
    frames = sum(c.shape[1] for c in codes)
    print(f"{args.out}: {len(kept)} utterances, {frames / codec.frame_rate / 3600:.2f} h, codec {codec.name}; "
          f"skipped {len(skipped)}")
    for s in skipped[:20]:
        print(f"  skipped {args.manifest}:{s['line']} ({s['id']}): {s['reason']}")
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more, listed under 'skipped' in {args.out}")


if __name__ == "__main__":
    main()
