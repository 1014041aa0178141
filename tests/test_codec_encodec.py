"""Offline tests of EncodecCodec's plumbing (codec.py), with an EnCodec built without pretrained weights.

Nothing here touches the network: the model is `encodec_model_24khz(pretrained=False)` with codebooks we
fill ourselves, and the one test of the pretrained path patches the download away. These tests check
shapes, resampling, down-mixing, batching, decoding and error handling - not audio quality.
"""
import os
import sys
import urllib.error

import pytest
import torch
import torchaudio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from codec import ENCODEC_FILE, EncodecCodec  # noqa: E402

from encodec import EncodecModel  # noqa: E402

SR = 24000


def noise(seconds, sr=SR, seed=0, channels=None):
    """Seeded white noise at -20 dBFS, [N] or [channels, N]."""
    g = torch.Generator().manual_seed(seed)
    shape = (int(seconds * sr),) if channels is None else (channels, int(seconds * sr))
    return 0.1 * torch.randn(shape, generator=g)


def init_codebooks(m):
    """Give EnCodec m (built with pretrained=False) usable codebooks, in place; returns m.

    Its codebooks are created empty (`inited` = 0, `embed` = zeros), to be filled by k-means on the first
    training batch; left like that every distance ties and every code is 0. That k-means is slow, and on
    a short batch it gives each frame its own cluster, so layers 2.. see zero residuals. Instead layer 1
    gets mu + r * (random unit vectors), mu the mean encoder frame (a random encoder's frames share a large
    common part), and layers 2.. get r * (random unit vectors): all entries of a layer lie at one distance
    r from its centre, so the nearest is the one best aligned with the residual and every layer varies.
    (tests/test_real_rehearsal.py saves such a model as the pretrained weights file.)
    """
    with torch.no_grad():
        frames = m.encoder(noise(0.5, seed=123).view(1, 1, -1))[0].T  # [T, D]
        mu = frames.mean(0)
        r = 0.25 * (frames - mu).norm(dim=1).mean()
        for q, layer in enumerate(m.quantizer.vq.layers):
            cb = layer._codebook
            dirs = torch.randn_like(cb.embed)
            cb.embed.copy_(r * dirs / dirs.norm(dim=1, keepdim=True) + (mu if q == 0 else 0))
            cb.inited.fill_(1)  # so that nothing re-initialises them
    return m


@pytest.fixture(scope="module")
def model():
    """EnCodec 24 kHz with random weights and usable codebooks (init_codebooks)."""
    torch.manual_seed(0)
    m = EncodecModel.encodec_model_24khz(pretrained=False)
    for mod in m.modules():  # fold weight norm into plain weights: same outputs, less work per call
        if hasattr(mod, "weight_g"):
            torch.nn.utils.remove_weight_norm(mod)
    return init_codebooks(m).eval()


@pytest.fixture(scope="module")
def codec(model):
    return EncodecCodec(model=model)


@pytest.fixture(scope="module")
def wav16_3s():
    return noise(3.0, sr=16000, seed=1)


@pytest.fixture(scope="module")
def codes_3s(codec, wav16_3s):
    """Codes of 3 s of 24 kHz noise: a 16 kHz signal that we resample ourselves (reused by the resampling
    test, which then needs one encode fewer)."""
    return codec.encode(torchaudio.functional.resample(wav16_3s, 16000, SR), SR)


def test_codes_are_nontrivial(codes_3s):
    # Guards the fixture: with the lazily-initialised codebooks left alone every code is 0, which would
    # make the equality tests below pass vacuously. Every layer must use more than one code.
    for q, layer in enumerate(codes_3s):
        assert layer.unique().numel() > 1, f"layer {q} emits a single code"


def test_shapes_dtypes_attributes(codec, codes_3s):
    # 6 kbps EnCodec 24 kHz: 8 codebooks of 1024 at 75 frames/s (hop 320).
    assert (codec.n_q, codec.card, codec.frame_rate, codec.sample_rate) == (8, (1024,) * 8, 75, 24000)
    assert codec.name == "encodec_24khz_6kbps"
    assert codes_3s.dtype == torch.long and codes_3s.shape == (8, 75 * 3)
    assert codes_3s.min() >= 0 and codes_3s.max() < 1024


def test_resampled_input(codec, wav16_3s, codes_3s):
    # 16 kHz input is resampled to 24 kHz with torchaudio's defaults before encoding, so it gives the
    # same number of frames and exactly the codes of doing that resampling ourselves (codes_3s).
    codes = codec.encode(wav16_3s, 16000)
    assert codes.shape == (8, 225)
    assert torch.equal(codes, codes_3s)


def test_stereo_is_downmixed(codec):
    stereo = noise(0.25, seed=3, channels=2)
    mono = stereo.mean(0)
    assert torch.equal(codec.encode(stereo, SR), codec.encode(mono, SR))
    # identical channels: the down-mix is the channel itself
    assert torch.equal(codec.encode(torch.stack([mono, mono]), SR), codec.encode(mono, SR))


def test_batch_matches_single(codec, model):
    # The 24 kHz model has no input normalisation (model.normalize is False) and no segmenting, so each
    # batch item is encoded on its own, yet the codes are not always identical: batched and single
    # convolutions round differently (encoder latents differ by ~3e-7 of ~0.1), and EnCodec's distance
    # |x|^2 - 2 x.e + |e|^2 loses precision to cancellation, so a near-tie between two entries can flip;
    # the frame's later layers then differ too. Measured over 8 seeds: 9 of 912 frames differ (<= 3 of
    # 114 per seed). So we ask that >= 90% of frames agree in all layers - a real mix-up (items
    # swapped or merged, a shift, batch-wide normalisation) agrees on almost none.
    assert model.normalize is False and model.segment is None
    wavs = noise(0.5, seed=4, channels=3)
    batch = codec.encode_batch(wavs, SR)
    single = torch.stack([codec.encode(w, SR) for w in wavs])
    assert batch.dtype == torch.long and batch.shape == single.shape == (3, 8, 38)
    agree = (batch == single).all(dim=1).float().mean().item()  # over (item, frame)
    assert agree >= 0.9, f"batched codes agree with single encodes on only {agree:.1%} of frames"


def test_decode_full_and_prefix(codec, codes_3s):
    wav, sr = codec.decode(codes_3s)
    assert sr == 24000
    assert wav.dim() == 1 and wav.dtype == torch.float32 and wav.shape[0] == 225 * 320
    assert torch.isfinite(wav).all()
    # EnCodec sums the embeddings of however many layers it is given, so a prefix of layers decodes
    # to the same length, and (using fewer layers) to a different waveform - only slightly different
    # here (~5e-6), as this random decoder barely responds to its input, hence torch.equal.
    # (Checked on the first 25 frames to keep this test fast.)
    full, _ = codec.decode(codes_3s[:, :25])
    head, _ = codec.decode(codes_3s[:2, :25])
    assert head.shape == full.shape == (25 * 320,) and torch.isfinite(head).all()
    assert not torch.equal(head, full)


def test_outputs_are_ordinary_tensors(codec, codes_3s):
    # Codes and audio must be usable like any tensor (as MelRVQCodec's are): edited in place, or fed to
    # a model under autograd. Tensors made under torch.inference_mode() refuse both.
    codes = codes_3s[:, :10]
    assert not codes.is_inference()
    torch.nn.Embedding(1024, 4)(codes).sum().backward()  # raises for an inference tensor
    codes[0, 0] = 0  # so does an in-place edit outside inference mode
    wav, _ = codec.decode(codes)
    assert not wav.is_inference()
    wav[0] = 0.0


def test_missing_weights_fail_fast(monkeypatch, tmp_path):
    # Offline, EnCodec's download raises URLError. EncodecCodec must turn that into a RuntimeError that
    # says which file to place where. The download is patched: no network is touched.
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("no network (patched)")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError) as err:
        EncodecCodec()
    assert calls and calls[0].endswith(ENCODEC_FILE)  # the failure came from fetching the weights
    assert isinstance(err.value.__cause__, urllib.error.URLError)
    msg = str(err.value)
    assert ENCODEC_FILE == "encodec_24khz-d7cc33bc.th" and ENCODEC_FILE in msg
    assert os.path.join(str(tmp_path), "hub", "checkpoints") in msg


@pytest.mark.parametrize("wav, sr, match", [
    (torch.zeros(0), SR, "empty"),
    (torch.tensor([0.0, float("nan"), 0.0]), SR, "NaN"),
    (torch.zeros(1, 2, 100), SR, "1-D.*2-D"),
    (torch.zeros(100, dtype=torch.int16), SR, "floating point"),
    (torch.zeros(100), 0, "sample rate"),
], ids=["empty", "nan", "3d", "int16", "sr0"])
def test_bad_audio_raises(codec, wav, sr, match):
    with pytest.raises(ValueError, match=match):
        codec.encode(wav, sr)


@pytest.mark.parametrize("codes, match", [
    (torch.full((8, 5), 1024), r"layer \d+ codes must lie in \[0, 1024\)"),
    (torch.full((8, 5), -1), "must lie in"),
    (torch.zeros(5, dtype=torch.long), "codes must be \\[q, T\\]"),
    (torch.zeros(1, 8, 5, dtype=torch.long), "codes must be \\[q, T\\]"),
    (torch.zeros(9, 5, dtype=torch.long), "1 <= q <= 8"),
    (torch.zeros(8, 0, dtype=torch.long), "T > 0"),
], ids=["too-big", "negative", "1d", "3d", "9-layers", "no-frames"])
def test_bad_codes_raise(codec, codes, match):
    with pytest.raises(ValueError, match=match):
        codec.decode(codes)


def test_expected_upper_layers_decode_like_codes(codec, model, codes_3s):
    """decode(layer 1, upper=sum_j onehot(codes_j) @ tables[j]) equals decode(all codes), which runs EnCodec's own
    EncodecModel.decode: the decoder reads the same latent (captured by a hook), and the waveforms agree far
    more closely than decoding layer 1 alone does (this random decoder barely responds: see above)."""
    codes = codes_3s[:, :25]
    tables = codec.tables()
    assert [t.shape for t in tables] == [(1024, 128)] * 8
    torch.testing.assert_close(tables[3], model.quantizer.vq.layers[3]._codebook.embed)
    upper = sum(torch.nn.functional.one_hot(codes[j], 1024).float() @ tables[j] for j in range(1, 8))
    latents = []
    hook = model.decoder.register_forward_pre_hook(lambda mod, args: latents.append(args[0].clone()))
    try:
        full, _ = codec.decode(codes)
        expected, _ = codec.decode(codes[:1], upper=upper)
        head, _ = codec.decode(codes[:1])
    finally:
        hook.remove()
    # measured: latents 1.5e-8 apart (3e-3 without the upper layers), waveforms 6e-8 (3.8e-6)
    torch.testing.assert_close(latents[1], latents[0], atol=1e-6, rtol=0)
    assert (latents[2] - latents[0]).abs().max() > 1e-3
    assert (expected - full).abs().max() < 0.1 * (head - full).abs().max()
    with pytest.raises(ValueError, match=r"upper must be a float \[T, D\] = \[25, 128\]"):
        codec.decode(codes[:1], upper=upper.T)
