"""synthesize.py: speaks a sentence with a test prompt, and refuses each bad input with a clear message and no
output file.

Most tests use a tiny untrained AR and NAR made here, whose vocabulary is the current phonemisation's phonemes
of SENTENCE: the shipped models were trained on an older phonemisation (stress fused into the vowels), and
these tests must hold for them and for their successors alike. test_shipped_models covers the shipped ones."""
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import synthesize
from codec import ENCODEC_FILE, EncodecCodec, codec_info, load_codec, load_corpus, median_f0
from speechalign import AR, NAR, LMConfig, TextTokenizer, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CODEC = REPO / "data/toy/codec.pt"
ENV = os.environ | {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
SENTENCE = "the cat sat in the sun"

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")


def save_models(d, codec, max_audio, kind="phonemes"):
    """Tiny untrained AR and NAR checkpoints d/ar.pt, d/nar.pt for `codec`, trained (say their args) with 3 s
    prompts; their vocabulary is SENTENCE's phonemes, or the letters."""
    tok = TextTokenizer.build([synthesize.phonemise(SENTENCE)] if kind == "phonemes" else [], kind)
    cfg = LMConfig(n_text=len(tok.symbols), card=codec.card, d_model=16, n_layer=1, n_head=2, max_text=64,
                   max_audio=max_audio)
    common = dict(config=asdict(cfg), step=0, tokenizer={"symbols": tok.symbols, "kind": tok.kind},
                  codec=codec_info(codec), args={"prompt_seconds": 3.0})
    torch.manual_seed(0)
    save_checkpoint(str(d / "ar.pt"), kind="ar", model=AR(cfg).state_dict(), **common)
    save_checkpoint(str(d / "nar.pt"), kind="nar", model=NAR(cfg).state_dict(), **common)
    return common


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny models for the toy codec, an AR that claims another codec, a prompt WAV (the first test_seen utterance
    of at least 4 s, decoded by the codec) and a 1 s prompt."""
    d = tmp_path_factory.mktemp("models")
    codec = load_codec(str(CODEC))
    common = save_models(d, codec, max_audio=400)
    other = common | {"codec": codec_info(codec) | {"name": "encodec_24khz_6kbps"}}
    save_checkpoint(str(d / "other_codec_ar.pt"), kind="ar", model=AR(LMConfig(**common["config"])).state_dict(),
                    **other)
    corpus = load_corpus(str(REPO / "data/toy/test_seen.pt"))
    first_long = next(u for u in corpus["utts"] if u.shape[1] >= 4 * codec.frame_rate)  # > the 3 s prompt
    wav, sr = codec.decode(first_long)
    sf.write(d / "voice.wav", wav.numpy(), sr)
    sf.write(d / "short.wav", wav[:sr].numpy(), sr)
    return d


def args(files, out, **kw):
    """Command-line arguments: the tiny models, the test prompt and SENTENCE, changed by kw (a list repeats)."""
    a = dict(text=SENTENCE, prompt=files / "voice.wav", out=out, ar=files / "ar.pt", nar=files / "nar.pt",
             codec=CODEC) | kw
    return [x for k, v in a.items() for item in (v if isinstance(v, list) else [v]) for x in (f"--{k}", str(item))]


def test_speaks_a_sentence_the_same_for_a_seed(files, tmp_path):
    """Two models named NAME=PATH write OUT's stem + .NAME.wav; a seed gives the same WAV in another process and
    with either model (the same checkpoint here), another seed another WAV."""
    run = lambda *a: subprocess.run([sys.executable, "synthesize.py", *a], cwd=REPO, env=ENV, capture_output=True,
                                    text=True, timeout=300)
    two = run(*args(files, tmp_path / "two.wav", ar=[f"sft={files / 'ar.pt'}", f"round3={files / 'ar.pt'}"]))
    assert two.returncode == 0, two.stderr[-3000:]
    one = run(*args(files, tmp_path / "one.wav"))
    assert one.returncode == 0, one.stderr[-3000:]
    synthesize.main(args(files, tmp_path / "seed1.wav", seed=1))
    assert sorted(os.listdir(tmp_path)) == ["one.wav", "seed1.wav", "two.round3.wav", "two.sft.wav"]
    wavs = {}
    for name in os.listdir(tmp_path):
        wav, sr = sf.read(tmp_path / name, dtype="float32")
        assert sr == 16000 and wav.ndim == 1 and len(wav) > 0 and np.isfinite(wav).all(), name
        wavs[name] = wav
    printed = {}  # each written file's duration, as printed
    for line in two.stdout.splitlines() + one.stdout.splitlines():
        name, seconds, path = re.fullmatch(r"(\w+): ([\d.]+) s of speech in (\S+)( \(.*\))?", line).groups()[:3]
        printed[Path(path).name] = (name, float(seconds))
    assert {path: name for path, (name, _) in printed.items()} == {"two.sft.wav": "sft", "two.round3.wav": "round3",
                                                                   "one.wav": "ar"}
    for name, (_, seconds) in printed.items():
        assert seconds == pytest.approx(len(wavs[name]) / 16000, abs=0.005)
    assert np.array_equal(wavs["two.sft.wav"], wavs["two.round3.wav"])
    assert np.array_equal(wavs["two.sft.wav"], wavs["one.wav"])
    seed0, seed1 = wavs["one.wav"], wavs["seed1.wav"]
    assert not (len(seed0) == len(seed1) and np.array_equal(seed0, seed1))


def test_nar_decoding_changes_only_the_upper_layers(files, tmp_path):
    """The default decodes the NAR's expected upper layers, --nar_decoding argmax its codes: the same AR sample
    (same seed, same length), another sound."""
    wav = {}
    for how in ("expected", "argmax"):
        synthesize.main(args(files, tmp_path / f"{how}.wav", nar_decoding=how))
        wav[how] = sf.read(tmp_path / f"{how}.wav", dtype="float32")[0]
    synthesize.main(args(files, tmp_path / "default.wav"))
    assert np.array_equal(sf.read(tmp_path / "default.wav", dtype="float32")[0], wav["expected"])
    assert len(wav["expected"]) == len(wav["argmax"]) and not np.allclose(wav["expected"], wav["argmax"], atol=1e-3)


def test_the_toy_codec_speaks_at_the_prompts_pitch_through_the_source_filter_decoder(files, tmp_path):
    """By default the toy codec's WAV comes from its source-filter decoder, at the pitch of the prompt as the AR
    reads it (its first 3 s, through Griffin-Lim); --vocoder griffin_lim decodes the same sample without it."""
    for how in ("auto", "griffin_lim"):
        synthesize.main(args(files, tmp_path / f"{how}.wav", vocoder=how))
    default, griffin_lim = (sf.read(tmp_path / f"{how}.wav", dtype="float32")[0] for how in ("auto", "griffin_lim"))
    codec = load_codec(str(CODEC))
    prompt, _ = synthesize.read_prompt(str(files / "voice.wav"), codec)
    f0 = codec.prompt_f0(prompt[:, :3 * codec.frame_rate])
    assert median_f0(torch.from_numpy(default), 16000) == pytest.approx(f0, rel=0.03)
    assert len(default) == len(griffin_lim) and not np.allclose(default, griffin_lim, atol=1e-3)


def refused(files, tmp_path, match, **kw):
    """synthesize.main refuses kw's change with a message matching `match` and writes nothing."""
    out = tmp_path / "out" / "speech.wav"
    with pytest.raises(SystemExit, match=match):
        synthesize.main(args(files, out, **kw))
    assert not out.parent.exists()


def test_missing_prompt(files, tmp_path):
    refused(files, tmp_path, r"--prompt .*nope\.wav: no such file", prompt=tmp_path / "nope.wav")


def test_unreadable_prompt(files, tmp_path):
    (tmp_path / "notes.wav").write_text("not audio\n")
    refused(files, tmp_path, r"--prompt .*notes\.wav: cannot read it as audio", prompt=tmp_path / "notes.wav")


def test_prompt_shorter_than_the_model_was_trained_with(files, tmp_path):
    refused(files, tmp_path, r"short\.wav is 1\.00 s; .*ar\.pt was trained with 3 s prompts",
            prompt=files / "short.wav")


def test_word_whose_phonemes_the_vocabulary_lacks(files, tmp_path):
    # "zoo" is "z ' u:": no z in SENTENCE's phonemes, and the message says so before the unknown u:
    refused(files, tmp_path, r"the word 'zoo' is \"z ' u:\", whose phoneme 'z' the \d+-symbol vocabulary of "
            r".*ar\.pt lacks", text="the cat sat in the zoo")


def test_word_that_espeak_ng_expands_is_still_named(files, tmp_path):
    # "42" is two groups ("forty two"): groups and words no longer pair up, the word is found by itself
    refused(files, tmp_path, r"the word '42' .* phoneme 'f'", text="the cat sat in 42")


def test_letters_models_name_the_letter_and_the_word(files, tmp_path):
    save_models(tmp_path, load_codec(str(CODEC)), max_audio=400, kind="letters")
    refused(tmp_path, tmp_path, r"the word 'Zoo!' is 'z o o !', whose letter '!' the 29-symbol vocabulary",
            text="the cat sat in the Zoo!", prompt=files / "voice.wav")


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text(files, tmp_path, text):
    refused(files, tmp_path, "--text is empty", text=text)


def test_espeak_ng_missing(files, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng on it
    refused(files, tmp_path, r"espeak-ng not found: .*apt-get install espeak-ng")


@pytest.mark.parametrize("option, path, match", [
    ("ar", "nar.pt", r"--ar .*nar\.pt holds an NAR model, not an AR: give it to --nar"),
    ("nar", "ar.pt", r"--nar .*ar\.pt holds an AR model, not an NAR: give it to --ar"),
    ("ar", CODEC, r"--ar .*codec\.pt is not a model checkpoint"),
])
def test_checkpoint_of_the_wrong_kind(files, tmp_path, option, path, match):
    refused(files, tmp_path, match, **{option: files / path})  # files / an absolute path is that path


def test_checkpoint_of_another_codec(files, tmp_path):
    refused(files, tmp_path, r"--ar .*other_codec_ar\.pt was trained on codec encodec_24khz_6kbps, but --codec "
            r".*codec\.pt is melrvq16k", ar=files / "other_codec_ar.pt")


def test_speaks_with_encodec_and_refuses_the_toy_codec_models(files, tmp_path, monkeypatch):
    """--codec encodec (a hand-initialised EnCodec where the encodec package looks for the pretrained file, as
    in test_real_rehearsal): a 24 kHz WAV from models of that codec; the toy codec's models are refused."""
    encodec = pytest.importorskip("encodec")
    from test_codec_encodec import init_codebooks

    torch.manual_seed(0)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(init_codebooks(encodec.EncodecModel.encodec_model_24khz(pretrained=False)).state_dict(),
               hub / ENCODEC_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    save_models(tmp_path, EncodecCodec(), max_audio=512)
    out = tmp_path / "speech.wav"
    synthesize.main(args(tmp_path, out, codec="encodec", prompt=files / "voice.wav"))
    wav, sr = sf.read(out, dtype="float32")
    assert sr == 24000 and len(wav) > 0 and np.isfinite(wav).all()
    with pytest.raises(SystemExit, match=r"--nar .*nar\.pt was trained on codec melrvq16k.*, but --codec encodec "
                       r"is encodec_24khz_6kbps"):
        synthesize.main(args(files, tmp_path / "toy.wav", codec="encodec"))
    assert not (tmp_path / "toy.wav").exists()


def test_several_models_must_be_named(files, tmp_path):
    refused(files, tmp_path, r"--ar given 2 times: name each model", ar=[files / "ar.pt", files / "ar.pt"])


@pytest.mark.parametrize("spec, match", [
    ("a b=nope.pt", r"--ar 'a b=nope\.pt': expected NAME=PATH"),  # eval.py's NAME=PATH rule
    ("sft=", r"--ar 'sft=': expected NAME=PATH"),
    ("nope.pt", r"--ar nope\.pt: no such file"),
])
def test_bad_ar_spec_or_missing_checkpoint(files, tmp_path, spec, match):
    refused(files, tmp_path, match, ar=spec)


def test_shipped_models(files, tmp_path, monkeypatch):
    """The defaults (data/toy's AR, NAR and codec) speak a test sentence of their grammar."""
    monkeypatch.chdir(REPO)  # the defaults are paths in the repository
    out = tmp_path / "out.wav"
    synthesize.main(["--text", "the old farmer carried a heavy basket", "--prompt", str(files / "voice.wav"),
                     "--out", str(out)])
    wav, sr = sf.read(out, dtype="float32")
    assert sr == 16000 and len(wav) > 0 and np.isfinite(wav).all()
