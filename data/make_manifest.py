"""Write a JSONL manifest for a real corpus: LibriTTS, LibriSpeech or VCTK, as downloaded.

    python data/make_manifest.py libritts  /data/LibriTTS/train-clean-100 data/libritts/train.jsonl
    python data/make_manifest.py librispeech /data/LibriSpeech/test-clean data/librispeech/test_clean.jsonl \
        --min_seconds 4 --max_seconds 10      # the VALL-E test protocol: 4-10 s utterances
    python data/make_manifest.py vctk /data/VCTK-Corpus-0.92 data/vctk/test.jsonl

Rows: {"id", "audio" (absolute path), "text", "speaker", "phonemes"}; phonemes come from espeak-ng
(en-us), in the same format as the toy corpus (`apt-get install espeak-ng`; --no_phonemes to skip).
Utterances whose text is empty are listed and left out; so are those outside the duration range.
"""
import argparse
import glob
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import soundfile as sf
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_toy_corpus import phonemise  # noqa: E402  (it puts the repository root on sys.path)
from codec import write_text  # noqa: E402


def libritts(root):
    for wav in sorted(glob.glob(os.path.join(root, "*", "*", "*.wav"))):
        txt = wav[:-4] + ".normalized.txt"
        if os.path.exists(txt):
            yield os.path.basename(wav)[:-4], wav, open(txt).read().strip(), wav.split(os.sep)[-3]


def librispeech(root):
    for trans in sorted(glob.glob(os.path.join(root, "*", "*", "*.trans.txt"))):
        for line in open(trans):
            utt, _, text = line.strip().partition(" ")
            yield utt, os.path.join(os.path.dirname(trans), utt + ".flac"), text.lower(), utt.split("-")[0]


def vctk(root):
    for txt in sorted(glob.glob(os.path.join(root, "txt", "*", "*.txt"))):
        utt = os.path.basename(txt)[:-4]
        spk = utt.split("_")[0]
        wav = os.path.join(root, "wav48_silence_trimmed", spk, utt + "_mic1.flac")
        if os.path.exists(wav):
            yield utt, wav, open(txt).read().strip(), spk


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", choices=["libritts", "librispeech", "vctk"])
    ap.add_argument("root")
    ap.add_argument("out")
    ap.add_argument("--min_seconds", type=float, default=0.0)
    ap.add_argument("--max_seconds", type=float, default=20.0)
    ap.add_argument("--no_phonemes", action="store_true")
    args = ap.parse_args()

    items = list({"libritts": libritts, "librispeech": librispeech, "vctk": vctk}[args.corpus](args.root))
    if not items:
        raise SystemExit(f"no {args.corpus} utterances found under {args.root}: is that the corpus folder?")
    rows, left_out = [], []
    for utt, wav, text, spk in tqdm(items, desc="check audio"):
        seconds = sf.info(wav).duration
        if not text:
            left_out.append(f"{utt}: empty transcript")
        elif not args.min_seconds <= seconds <= args.max_seconds:
            left_out.append(f"{utt}: {seconds:.1f} s outside [{args.min_seconds:g}, {args.max_seconds:g}]")
        else:
            rows.append({"id": utt, "audio": os.path.abspath(wav), "text": text, "speaker": spk})
    if not args.no_phonemes:
        with ThreadPoolExecutor(os.cpu_count()) as ex:
            for row, ph in zip(rows, tqdm(ex.map(phonemise, [r["text"] for r in rows]), total=len(rows),
                                          desc="phonemise")):
                row["phonemes"] = ph
    write_text(args.out, "".join(json.dumps(row) + "\n" for row in rows))
    print(f"{args.out}: {len(rows)} utterances, {len({r['speaker'] for r in rows})} speakers; "
          f"left out {len(left_out)}")
    for line in left_out[:10]:
        print("  left out", line)


if __name__ == "__main__":
    main()
