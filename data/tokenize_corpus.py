"""Tokenise a JSONL manifest with a codec into one corpus file (format: codec.py, "tokenised corpora").

    python data/tokenize_corpus.py data/toy_corpus/test_seen.jsonl data/toy/test_seen.pt --codec data/toy/codec.pt
    python data/tokenize_corpus.py libritts/train.jsonl libritts/train.pt --codec encodec

Manifest lines: {"id", "audio", "text", "speaker"} and optionally "phonemes"; `audio` is a path relative to
the manifest's folder (or absolute). The whole manifest is checked before any audio is read, so a bad line
(not JSON, a missing or empty field, a duplicate id) stops the run at once with file:line. Audio that cannot
be read, is empty or silent, holds NaN or infinite samples, or is longer than --max_seconds is skipped, counted
and listed in the output file. Tokenising LibriTTS takes hours: every --shard_size manifest lines (and on an
interruption) the finished part is saved in OUT.partial/, and a run with the same arguments carries on after it;
the folder is removed once OUT is written.

--speed makes new voices for the NAR's training from the same audio: utterance i is heard as a tape played at
speed F = speed[i % len(speed)] (pitch and formants scale by F, duration by 1/F), as the voice "SPEAKER@F" with the id
"ID@F". (data/fit_toy_codec.py's --tape does the same for the codec's fitting.)

    python data/tokenize_corpus.py data/toy_corpus/train.jsonl runs/toy/data/train_tape.pt --codec data/toy/codec.pt \
        --speed 0.82 0.9 1.1 1.2
"""
import argparse
import glob
import json
import os
import shutil
import sys

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from codec import load_codec, load_corpus, save_corpus  # noqa: E402

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


def tokenise(row, root, codec, max_seconds, speed=1.0):
    """(codes [Q, T] as int16, None) for a usable utterance, (None, the reason) for one to skip and list. speed: the
    audio heard as a tape played that much faster (its samples read as if recorded at speed * sr)."""
    path = os.path.join(root, row["audio"])
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # missing file, not audio, truncated...
        return None, f"unreadable {path}: {e}"
    seconds = wav.shape[0] / (sr * speed)
    if not np.isfinite(wav).all():
        return None, f"NaN or infinite samples in {path}"
    if wav.shape[0] == 0 or not (wav != 0).any():
        return None, f"empty or silent audio {path}"
    if seconds > max_seconds:
        return None, f"too long: {seconds:.1f} s > --max_seconds {max_seconds:g} ({path})"
    # int16, as the corpus file stores them: a quarter of int64's memory for the hours of codes held until the end
    return codec.encode(torch.from_numpy(wav.T.copy()), round(sr * speed)).to(torch.int16), None


def load_shards(folder, rows, codec, max_seconds, speed):
    """What an interrupted run finished: its shards in folder, each checked to come from the same manifest lines,
    codec, --max_seconds and --speed. Returns (rows done, [(row, codes)] kept, skipped)."""
    done, kept, skipped = 0, [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.pt"))):
        shard = load_corpus(path)
        n = len(shard["manifest_rows"])
        if (shard["first_row"], shard["codec"]["name"], shard["max_seconds"], shard.get("speed"),
                shard["manifest_rows"]) != (done, codec.name, max_seconds, speed, rows[done:done + n]):
            raise SystemExit(f"{path}: this part of an earlier run does not follow on from the parts before it or "
                             "was made from other manifest lines, another codec, --max_seconds or --speed: run with "
                             f"the same arguments to carry on, or delete {folder} to start over")
        fields = zip(shard["ids"], shard["texts"], shard["phonemes"], shard["speakers"], shard["utts"])
        kept += [(dict(id=i, text=t, phonemes=p, speaker=s), c.to(torch.int16)) for i, t, p, s, c in fields]
        skipped += shard["skipped"]
        done += n
    return done, kept, skipped


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest")
    ap.add_argument("out")
    ap.add_argument("--codec", required=True, help="'encodec' or the path of a fitted toy codec")
    ap.add_argument("--max_seconds", type=float, default=20.0)
    ap.add_argument("--limit", type=int, default=None, help="keep only the first N utterances")
    ap.add_argument("--speed", type=float, nargs="+", default=None,
                    help="new voices: utterance i heard as a tape at speed[i %% len(speed)] (module docstring)")
    ap.add_argument("--shard_size", type=int, default=1000, help="manifest lines per part saved in OUT.partial/ "
                    "as the run goes (an interrupted run carries on after the last part; removed at the end)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small per-utterance work: one thread is fastest here

    rows = read_manifest(args.manifest)[: args.limit]
    if args.speed and not all(0.5 <= f <= 2 for f in args.speed):
        raise SystemExit(f"--speed {args.speed}: each speed must be within [0.5, 2]")
    speeds = [args.speed[i % len(args.speed)] if args.speed else 1.0 for i in range(len(rows))]
    if args.speed:  # the voice and the id say which tape they are
        rows = [r | {"id": f"{r['id']}@{f:g}", "speaker": f"{r['speaker']}@{f:g}"} for r, f in zip(rows, speeds)]
    codec = load_codec(args.codec)
    root = os.path.dirname(os.path.abspath(args.manifest))
    parts = f"{args.out}.partial"
    done, kept, skipped = (load_shards(parts, rows, codec, args.max_seconds, args.speed) if os.path.isdir(parts)
                           else (0, [], []))
    if done:
        print(f"carrying on after {done} of {len(rows)} manifest lines, done before ({parts})")
    mark = [done, len(kept), len(skipped)]  # where the part being filled starts: manifest row, kept, skipped

    def save_part():
        first, k, s = mark
        end = first + len(kept) - k + len(skipped) - s  # every finished row is either kept or skipped
        if end > first:
            os.makedirs(parts, exist_ok=True)
            save_corpus(os.path.join(parts, f"{first:09d}.pt"), codec, [r for r, _ in kept[k:]],
                        [c for _, c in kept[k:]], args.manifest, skipped[s:], manifest_rows=rows[first:end],
                        first_row=first, max_seconds=args.max_seconds, speed=args.speed)
            mark[:] = end, len(kept), len(skipped)

    try:
        for row, speed in tqdm(zip(rows[done:], speeds[done:]), desc=f"tokenise {os.path.basename(args.manifest)}",
                               initial=done, total=len(rows)):
            codes, reason = tokenise(row, root, codec, args.max_seconds, speed)
            if reason is None:
                kept.append((row, codes))  # one append per row: an interruption never leaves half a row
            else:
                skipped.append({"line": row["line"], "id": row["id"], "reason": reason})
            if len(kept) - mark[1] + len(skipped) - mark[2] >= args.shard_size:
                save_part()
    except BaseException:  # Ctrl-C or an error: keep the rows finished since the last part for the next run
        save_part()
        raise

    if not kept:
        raise SystemExit(f"{args.manifest}: every utterance was skipped, nothing written; first reason: "
                         f"{skipped[0]['reason']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    codes = [c for _, c in kept]
    save_corpus(args.out, codec, [r for r, _ in kept], codes, source=args.manifest, skipped=skipped, speed=args.speed)
    shutil.rmtree(parts, ignore_errors=True)
    frames = sum(c.shape[1] for c in codes)
    print(f"{args.out}: {len(kept)} utterances, {frames / codec.frame_rate / 3600:.2f} h, codec {codec.name}; "
          f"skipped {len(skipped)}")
    for s in skipped[:20]:
        print(f"  skipped {args.manifest}:{s['line']} ({s['id']}): {s['reason']}")
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more, listed under 'skipped' in {args.out}")


if __name__ == "__main__":
    main()
