r"""Speak a sentence in the voice of a prompt: the AR samples codec layer 1, the NAR fills in the rest, the codec
decodes it to a WAV.

    python synthesize.py --text "the old farmer carried a heavy basket" --prompt voice.wav --out out.wav
    python synthesize.py --text "..." --prompt voice.wav --out out.wav \
        --ar sft=data/toy/sft_ar.pt --ar round3=runs/toy/align/round3/ar.pt    # out.sft.wav, out.round3.wav

The text is phonemised as the training data was (espeak-ng, data/make_toy_corpus.py's `phonemise`). The voice
is the first seconds of the prompt, as many as the AR was trained with (its --prompt_seconds, 3 s by default).
Sampling is the one evaluation and SpeechAlign use (speechalign.SAMPLING) from a generator seeded by --seed, and
the NAR is deterministic (its expected upper layers by default, as in eval.py), and so is the decoder (with the
toy codec, by default the source-filter decoder at the prompt's pitch, as in eval.py), so a seed gives the same
WAV on the same machine.
"""
import argparse
import os
import shutil
import sys

import soundfile as sf
import torch
from tqdm import tqdm

from codec import VOCODERS, choose_vocoder, decode_codes, load_codec, write_wav
from eval import named
from speechalign import SAMPLING, frame_limit, load_model, read_checkpoint, synthesise

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
from make_toy_corpus import phonemise  # noqa: E402


def get_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True, help="the sentence to speak")
    ap.add_argument("--prompt", required=True, help="audio file of the voice to speak in (any rate, mono or not)")
    ap.add_argument("--out", required=True, help="the WAV to write (with several --ar: OUT's name + .NAME.wav)")
    ap.add_argument("--ar", action="append", metavar="[NAME=]PATH",
                    help="AR checkpoint (default data/toy/sft_ar.pt); repeat as NAME=PATH for one WAV per model")
    ap.add_argument("--nar", default="data/toy/sft_nar.pt", help="the NAR checkpoint that fills in layers 2..Q")
    ap.add_argument("--codec", default="data/toy/codec.pt", help="toy codec file, or 'encodec'")
    ap.add_argument("--nar_decoding", choices=("argmax", "expected"), default="expected",
                    help="the NAR's upper layers as its argmax codes or its expected codebook vectors (eval.py's)")
    ap.add_argument("--vocoder", choices=VOCODERS, default="auto",
                    help="the toy codec's decoder (eval.py's --vocoder; auto: source_filter at the prompt's pitch "
                         "for the toy codec, EnCodec's own decoder for EnCodec)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the AR's sampling")
    return ap.parse_args(argv)


def systems(specs, out):
    """[(name, checkpoint, WAV path)]: one AR writes OUT; several, named as eval.py's --ar NAME=PATH, write
    OUT's stem + .NAME + its extension (out.sft.wav, out.round3.wav)."""
    parsed = []
    for spec in specs or ["data/toy/sft_ar.pt"]:
        plain = "=" not in spec or os.path.exists(spec)  # a plain path (even one with '=' in it)
        parsed.append((None, spec) if plain else named(spec))
    if len(parsed) == 1:
        return [(parsed[0][0] or "ar", parsed[0][1], out)]
    names = [n for n, _ in parsed]
    if None in names or len(set(names)) < len(names):
        raise SystemExit(f"--ar given {len(parsed)} times: name each model, once, as NAME=PATH (one WAV each)")
    stem, ext = os.path.splitext(out)
    return [(n, p, f"{stem}.{n}{ext or '.wav'}") for n, p in parsed]


def check_checkpoint(path, kind, what):
    """The checkpoint's stored dict, read without loading its weights; refused, naming the option, unless it
    holds a `kind` model."""
    try:
        return read_checkpoint(path, kind, mmap=True)
    except ValueError as e:
        other = "nar" if kind == "ar" else "ar"
        hint = f": give it to --{other}" if f"holds an {other.upper()} model" in str(e) else ""
        raise SystemExit(f"{what} {e}{hint}") from None


def read_prompt(path, codec):
    """The prompt file's codes [Q, T] and its duration in seconds. The whole file is encoded and the caller takes
    its first frames, as the corpus's prompts are the first frames of utterances encoded whole (with the toy
    codec, the frames depend on the utterance's mean log-mel)."""
    if not os.path.isfile(path):
        raise SystemExit(f"--prompt {path}: no such file")
    try:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # not audio, truncated, a format libsndfile does not read
        raise SystemExit(f"--prompt {path}: cannot read it as audio ({e})") from None
    if not (wav != 0).any():
        raise SystemExit(f"--prompt {path}: the audio is empty or silent")
    try:
        codes = codec.encode(torch.from_numpy(wav.T.copy()), sr)
    except ValueError as e:  # as_mono's checks: NaN or infinite samples
        raise SystemExit(f"--prompt {path}: {e}") from None
    return codes, len(wav) / sr


def text_ids(text, tok, model_path):
    """Token ids of the text in the model's vocabulary; a symbol outside it is refused, naming it and its word."""
    words = text.split()
    if not words:
        raise SystemExit("--text is empty: give the sentence to speak")
    if tok.kind == "letters":
        spoken, groups = text, [list(w.lower()) for w in words]
    else:
        if shutil.which("espeak-ng") is None:
            raise SystemExit("espeak-ng not found: it phonemises the text as the training data was "
                             "(apt-get install espeak-ng)")
        spoken = phonemise(text)
        groups = [g.split() for g in spoken.split("|")]  # one group per word, unless espeak-ng expands (42, Dr.)
        if not spoken.split():
            raise SystemExit(f"--text {text!r}: espeak-ng finds nothing to say in it")
    for i, group in enumerate(groups):
        for s in group:
            if s not in tok.index:
                word, said = word_of(s, i, words, groups)
                raise SystemExit(f"--text: the word {word!r} is {' '.join(said)!r}, whose {tok.kind[:-1]} {s!r} "
                                 f"the {len(tok.symbols)}-symbol vocabulary of {model_path} lacks (the model "
                                 "never saw it in training): rephrase the word")
    return tok.encode(spoken)


def word_of(symbol, i, words, groups):
    """The word that says group i (which holds `symbol`), and its phonemes. espeak-ng writes one group per word
    unless it expands a word (42 -> forty two): then the first word whose own phonemes hold the symbol."""
    if len(groups) == len(words):
        return words[i], groups[i]
    for w in words:
        if symbol in (said := phonemise(w).split()):
            return w, said
    return " ".join(groups[i]), groups[i]


def main(argv=None):
    args = get_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    jobs = systems(args.ar, args.out)
    # every check that reads little comes before the codec (EnCodec is slow to load) and before any sampling
    nar_ckpt = check_checkpoint(args.nar, "nar", "--nar")
    ckpts = {path: check_checkpoint(path, "ar", "--ar") for _, path, _ in jobs}
    for path, ckpt in ckpts.items():
        if ckpt["tokenizer"] != nar_ckpt["tokenizer"]:
            raise SystemExit(f"--ar {path}: its text vocabulary differs from the NAR's ({args.nar}); AR and NAR "
                             "must read the same text ids")
        positions = [(c["config"]["max_text"], c["config"]["max_audio"]) for c in (ckpt, nar_ckpt)]
        if positions[0] != positions[1]:
            raise SystemExit(f"--ar {path}: its positions (text, audio) {positions[0]} differ from the NAR's "
                             f"{positions[1]} ({args.nar}); the NAR reads what the AR samples")
    try:
        codec = load_codec(args.codec, device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--codec: {e}") from None
    try:
        vocoder = choose_vocoder(codec, args.vocoder)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for what, path, ckpt in [("--nar", args.nar, nar_ckpt)] + [("--ar", p, c) for p, c in ckpts.items()]:
        if ckpt["codec"]["name"] != codec.name:
            raise SystemExit(f"{what} {path} was trained on codec {ckpt['codec']['name']}, but --codec {args.codec} "
                             f"is {codec.name}: it would read and write another codec's codes")
    prompt, seconds = read_prompt(args.prompt, codec)
    nar, tok, _ = load_model(args.nar, "nar", device)
    ids = text_ids(args.text, tok, jobs[0][1])
    frames = {}  # per AR, the prompt length it was trained with (every command's default is 3 s)
    for path, ckpt in ckpts.items():
        frames[path] = need = int(ckpt.get("args", {}).get("prompt_seconds", 3.0) * codec.frame_rate)
        if prompt.shape[1] < need:
            raise SystemExit(f"--prompt {args.prompt} is {seconds:.2f} s; {path} was trained with "
                             f"{need / codec.frame_rate:g} s prompts: give at least that much of the voice")
        cfg = ckpt["config"]
        if len(ids) > cfg["max_text"] or need >= cfg["max_audio"]:
            raise SystemExit(f"--text is {len(ids)} tokens and the prompt {need} frames; {path} holds at most "
                             f"{cfg['max_text']} and {cfg['max_audio'] - 1}: say it in shorter parts")
    tables = codec.tables() if args.nar_decoding == "expected" else None
    for name, path, out in jobs:
        ar, need = load_model(path, "ar", device)[0], frames[path]
        limit = min(frame_limit(SAMPLING["seconds_per_token"], codec.frame_rate, len(ids)), ar.cfg.max_audio - need)
        g = torch.Generator(device=device).manual_seed(args.seed)
        with tqdm(total=limit, desc=f"{name}: sample", unit="frame") as bar:
            # one AR forward per sampled frame; the hook returns None (a value would replace the forward's output)
            hook = ar.register_forward_hook(lambda *_: bar.update() and None)
            try:
                codes, hit_limit, *upper = synthesise(ar, nar, [ids], [prompt[:, :need]], generator=g,
                                                      expected=tables, frame_rate=codec.frame_rate, **SAMPLING)
            finally:
                hook.remove()
        f0 = codec.prompt_f0(prompt[:, :need]) if vocoder == "source_filter" else None
        wav, sr = decode_codes(codec, codes[0], upper[0][0] if upper else None, f0)
        write_wav(out, wav, sr)
        note = f" (it did not stop by itself: cut at the length limit, {limit} frames)" if hit_limit[0] else ""
        print(f"{name}: {len(wav) / sr:.2f} s of speech in {out}{note}")


if __name__ == "__main__":
    main()
