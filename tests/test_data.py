"""Data pipeline: manifest checks, tokenisation (skips, file format), and the toy-corpus script."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from codec import MelRVQCodec, load_corpus
from tests.synth import SR, voice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZE = os.path.join(ROOT, "data", "tokenize_corpus.py")


@pytest.fixture(scope="module")
def codec_path(tmp_path_factory):
    codec = MelRVQCodec.fit([(voice(1.0, f0, s), SR) for s, f0 in enumerate([120, 180, 240])],
                            card=(32, 16), iters=5)
    path = tmp_path_factory.mktemp("codec") / "codec.pt"
    codec.save(path)
    return path


def write_manifest(folder, rows):
    with open(folder / "m.jsonl", "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return folder / "m.jsonl"


def tokenize(manifest, out, codec_path, *extra):
    return subprocess.run([sys.executable, TOKENIZE, str(manifest), str(out), "--codec", str(codec_path), *extra],
                          capture_output=True, text=True)


def test_tokenize_keeps_good_skips_bad_and_lists_why(tmp_path, codec_path):
    sf.write(tmp_path / "a.wav", voice(1.0, 150, 1).numpy(), SR)
    sf.write(tmp_path / "b.wav", np.stack([voice(1.2, 200, 2).numpy()] * 2, 1), 22050)  # stereo, other rate
    sf.write(tmp_path / "long.wav", voice(3.0, 150, 3).numpy(), SR)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), SR)
    (tmp_path / "junk.wav").write_text("not audio")
    rows = [{"id": i, "audio": f"{i}.wav", "text": f"say {i}", "speaker": "s1", "phonemes": "s 'eI"}
            for i in ["a", "b", "long", "empty", "junk", "missing"]]
    manifest = write_manifest(tmp_path, rows)
    res = tokenize(manifest, tmp_path / "out.pt", codec_path, "--max_seconds", "2")
    assert res.returncode == 0, res.stderr
    corpus = load_corpus(tmp_path / "out.pt")  # torch.load(weights_only=True)
    assert corpus["ids"] == ["a", "b"] and corpus["texts"] == ["say a", "say b"]
    assert corpus["phonemes"] == ["s 'eI"] * 2 and corpus["speakers"] == ["s1", "s1"]
    assert corpus["codes"].dtype == torch.int16
    codec = MelRVQCodec.load(codec_path)
    assert corpus["codec"]["name"] == codec.name and corpus["codec"]["card"] == [32, 16]
    assert torch.equal(corpus["utts"][0], codec.encode(voice(1.0, 150, 1), SR))
    n_16k = math.ceil(len(voice(1.2, 200, 2)) * SR / 22050)  # written as 22.05 kHz, resampled to 16 kHz
    assert corpus["utts"][1].shape == (2, 1 + n_16k // 320)
    skipped = {s["id"]: s for s in corpus["skipped"]}
    assert set(skipped) == {"long", "empty", "junk", "missing"}
    assert "too long" in skipped["long"]["reason"] and "empty" in skipped["empty"]["reason"]
    assert "unreadable" in skipped["junk"]["reason"] and skipped["missing"]["line"] == 6
    assert "skipped 4" in res.stdout


def test_tokenize_speed_hears_each_utterance_as_a_tape_a_new_voice(tmp_path, codec_path):
    """--speed F: the codes of the audio heard at F times its speed, which is what a file holding the same
    samples but declaring F times the rate gives (tokenised plainly: the other route to the same tape); the
    voice and id are marked with F, speeds cycle over the utterances, and --max_seconds reads the tape's length."""
    a, b = voice(1.0, 150, 1).numpy(), voice(1.0, 200, 2).numpy()
    sf.write(tmp_path / "a.wav", a, SR), sf.write(tmp_path / "b.wav", b, SR)
    sf.write(tmp_path / "c.wav", voice(1.2, 150, 3).numpy(), SR)
    sf.write(tmp_path / "a_tape.wav", a, SR // 2), sf.write(tmp_path / "b_tape.wav", b, SR * 5 // 4)
    rows = [{"id": i, "audio": f"{i}.wav", "text": f"say {i}", "speaker": "s1", "phonemes": "s 'eI"}
            for i in ["a", "b", "c", "a_tape", "b_tape"]]
    manifest = write_manifest(tmp_path, rows)
    res = tokenize(manifest, tmp_path / "tape.pt", codec_path, "--speed", "0.5", "1.25", "--max_seconds", "2.2",
                   "--limit", "3")
    assert res.returncode == 0, res.stderr
    tape = load_corpus(tmp_path / "tape.pt")
    assert tape["ids"] == ["a@0.5", "b@1.25"] and tape["speakers"] == ["s1@0.5", "s1@1.25"]
    assert tape["texts"] == ["say a", "say b"] and tape["speed"] == [0.5, 1.25]
    skipped = tape["skipped"]
    assert [s["id"] for s in skipped] == ["c@0.5"] and "2.4 s" in skipped[0]["reason"]  # 1.2 s at half speed
    assert tokenize(manifest, tmp_path / "plain.pt", codec_path).returncode == 0
    plain = load_corpus(tmp_path / "plain.pt")
    assert torch.equal(tape["utts"][0], plain["utts"][3]) and torch.equal(tape["utts"][1], plain["utts"][4])
    assert tape["utts"][0].shape[1] == 1 + 2 * len(a) // 320  # twice as long at half speed
    assert not torch.equal(tape["utts"][1][:, :10], plain["utts"][1][:, :10])
    res = tokenize(manifest, tmp_path / "bad.pt", codec_path, "--speed", "3")
    assert res.returncode != 0 and "within [0.5, 2]" in res.stderr


TOY_CODEC = os.path.join(ROOT, "data", "toy", "codec.pt")


def test_tokenize_skips_nan_and_infinite_audio_and_lists_its_line(tmp_path):
    nan, inf = voice(0.8, 150, 2).numpy(), voice(0.8, 150, 3).numpy()
    nan[100], inf[200] = np.nan, -np.inf
    for name, wav in [("a", voice(0.8, 150, 1).numpy()), ("nan", nan), ("inf", inf), ("b", voice(0.8, 200, 4).numpy())]:
        sf.write(tmp_path / f"{name}.wav", wav, SR, subtype="FLOAT")  # float WAVs can hold NaN and inf
    rows = [{"id": i, "audio": f"{i}.wav", "text": f"say {i}", "speaker": "s1"} for i in ["a", "nan", "inf", "b"]]
    res = tokenize(write_manifest(tmp_path, rows), tmp_path / "out.pt", TOY_CODEC)
    assert res.returncode == 0, res.stderr
    corpus = load_corpus(tmp_path / "out.pt")
    assert corpus["ids"] == ["a", "b"]
    assert [(s["line"], s["id"]) for s in corpus["skipped"]] == [(2, "nan"), (3, "inf")]
    assert all("NaN or infinite" in s["reason"] for s in corpus["skipped"])
    assert "m.jsonl:2 (nan)" in res.stdout and "m.jsonl:3 (inf)" in res.stdout


@pytest.fixture(scope="module")
def tokenize_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("tokenize_corpus", TOKENIZE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingCodec:
    """The toy codec, counting its encode calls; call number `stop` raises KeyboardInterrupt (a Ctrl-C)."""

    def __init__(self, stop=None):
        self.codec, self.calls, self.stop = MelRVQCodec.load(TOY_CODEC), 0, stop

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def encode(self, wav, sr):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.codec.encode(wav, sr)


def test_an_interrupted_tokenisation_carries_on_and_ends_as_an_uninterrupted_one(tmp_path, tokenize_module,
                                                                                 monkeypatch):
    """7 manifest lines (line 3 unreadable), parts of 3 lines: encode call 4 (line 5) is interrupted; the part
    with line 4, finished after the last periodic part, is saved on the way out. The next run encodes lines 5-7
    only, and writes the same bytes as a run that was never interrupted."""
    names = ["g0", "g1", "junk", "g2", "g3", "g4", "g5"]
    for k, name in enumerate(names):
        sf.write(tmp_path / f"{name}.wav", voice(0.5 + 0.1 * k, 120 + 20 * k, k).numpy(), SR)
    (tmp_path / "junk.wav").write_text("not audio")
    manifest = write_manifest(tmp_path, [{"id": n, "audio": f"{n}.wav", "text": f"say {n}", "speaker": "s"}
                                         for n in names])
    (tmp_path / "once").mkdir()
    (tmp_path / "twice").mkdir()

    def run(out, codec, *extra):
        monkeypatch.setattr(tokenize_module, "load_codec", lambda spec: codec)
        tokenize_module.main([str(manifest), str(out), "--codec", TOY_CODEC, "--shard_size", "3", *extra])

    run(tmp_path / "once" / "out.pt", CountingCodec())
    out, parts = tmp_path / "twice" / "out.pt", tmp_path / "twice" / "out.pt.partial"
    with pytest.raises(KeyboardInterrupt):
        run(out, CountingCodec(stop=4))
    assert sorted(p.name for p in parts.iterdir()) == ["000000000.pt", "000000003.pt"] and not out.exists()
    for other in (["--max_seconds", "5"], ["--speed", "0.9"]):  # another setting cannot reuse the parts
        with pytest.raises(SystemExit, match="000000000.pt: .*other manifest lines, another codec, --max_seconds or "
                                             "--speed"):
            run(out, CountingCodec(), *other)
    resumed = CountingCodec()
    run(out, resumed)
    assert resumed.calls == 3  # g3, g4, g5: nothing finished before is encoded again
    assert out.read_bytes() == (tmp_path / "once" / "out.pt").read_bytes() and not parts.exists()
    corpus = load_corpus(out)
    assert corpus["ids"] == ["g0", "g1", "g2", "g3", "g4", "g5"] and [s["line"] for s in corpus["skipped"]] == [3]


@pytest.mark.parametrize("line, message", [
    ("{not json", "m.jsonl:2: not valid JSON"),
    (json.dumps({"id": "x", "audio": "a.wav", "text": "  ", "speaker": "s"}), "m.jsonl:2: field 'text'"),
    (json.dumps({"id": "x", "audio": "a.wav", "text": "hi"}), "m.jsonl:2: field 'speaker'"),
    (json.dumps({"id": "a", "audio": "a.wav", "text": "hi", "speaker": "s"}), "m.jsonl:2: duplicate id 'a'"),
])
def test_bad_manifest_line_names_file_and_line(tmp_path, codec_path, line, message):
    sf.write(tmp_path / "a.wav", voice(0.5, 150, 1).numpy(), SR)
    good = {"id": "a", "audio": "a.wav", "text": "hello", "speaker": "s"}
    manifest = write_manifest(tmp_path, [good, line])
    res = tokenize(manifest, tmp_path / "out.pt", codec_path)
    assert res.returncode != 0 and message in res.stderr
    assert not (tmp_path / "out.pt").exists()  # nothing half-written


@pytest.mark.skipif(not (shutil.which("flite") and shutil.which("espeak-ng") and shutil.which("text2wave")),
                    reason="needs Debian's flite, espeak-ng and festival (apt-get install flite espeak-ng festival "
                           "festvox-kdlpc16k)")
def test_toy_corpus_script_end_to_end(tmp_path):
    """A miniature corpus: every voice speaks, splits are disjoint in text, unseen speakers stay out of train,
    and a second run resumes: it rewrites the manifests but no WAV."""
    cmd = [sys.executable, os.path.join(ROOT, "data", "make_toy_corpus.py"), "--out", str(tmp_path),
           "--train_per_speaker", "1", "--test_per_speaker", "1", "--unseen_per_speaker", "1",
           "--dev_per_speaker", "1", "--dev_unseen_per_speaker", "1", "--dev_oog", "6", "--codec_fit_per_voice", "1",
           "--workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    names = ["train", "codec_fit", "dev_seen", "dev_unseen", "dev_oog", "test_seen", "test_unseen"]
    split = {s: [json.loads(l) for l in open(tmp_path / f"{s}.jsonl")] for s in names}
    assert len(split["train"]) == 6 and len(split["test_seen"]) == 6 and len(split["test_unseen"]) == 2
    assert len(split["dev_seen"]) == 6 and len(split["dev_unseen"]) == 2 and len(split["dev_oog"]) == 6
    train_spk = {r["speaker"] for r in split["train"]}
    assert train_spk == {"awb", "awb_high", "rms", "rms_low", "slt", "slt_high"}
    assert {r["speaker"] for r in split["test_seen"]} == train_spk
    assert {r["speaker"] for r in split["dev_seen"]} == {r["speaker"] for r in split["dev_oog"]} == train_spk
    espeak = "m1 m2 m3 m4 m5 m7 f1 f2 f3 f4 Andy Gene Michael Mike Paul Rob Steph Zac grandpa klatt".split()
    assert len(split["codec_fit"]) == 20 and {r["speaker"] for r in split["codec_fit"]} == {f"esp_{v}" for v in espeak}
    unseen = {r["speaker"] for r in split["test_unseen"] + split["dev_unseen"]}
    assert unseen == {"kal16", "ked"} and {r["speaker"] for r in split["test_unseen"]} == unseen
    texts = {s: {r["text"] for r in rows} for s, rows in split.items()}
    assert not texts["train"] & (texts["test_seen"] | texts["test_unseen"])
    assert sum(len(t) for t in texts.values()) == len(set().union(*texts.values()))  # all splits disjoint
    for r in sum(split.values(), []):
        assert 5 <= len(r["text"].split()) <= 12
        assert r["phonemes"].count("|") == len(r["text"].split()) - 1  # one phoneme group per word
        assert all(r["phonemes"].split(" "))  # single spaces: no empty phoneme tokens
        info = sf.info(tmp_path / r["audio"])
        assert info.samplerate == 16000 and info.channels == 1 and 0.5 < info.duration < 8
    wavs = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.wav")}
    assert len(wavs) == 48
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.wav")} == wavs
