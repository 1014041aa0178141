"""The toy mel-RVQ codec: shapes, round trip, layer prefixes, determinism, bad input, save/load."""
import pytest
import torch

from codec import MelRVQCodec, decode_codes, envelope_projection, kmeans, log_mel_distance, median_f0
from tests.synth import SR, voice


@pytest.fixture(scope="module")
def codec():
    train = [(voice(1.5, f0, seed), SR) for seed, f0 in enumerate([110, 140, 180, 220, 260, 120, 200, 240])]
    return MelRVQCodec.fit(train, card=(64, 32, 32, 32), iters=10, seed=0)


def test_shapes_dtype_range(codec):
    wav = voice(2.0, 150, seed=99)
    codes = codec.encode(wav, SR)
    assert codes.dtype == torch.long
    assert codes.shape == (4, 1 + len(wav) // 320)  # 50 frames/s, centred frames
    for q, card in enumerate(codec.card):
        assert 0 <= codes[q].min() and codes[q].max() < card
    out, sr = codec.decode(codes)
    assert sr == SR and out.dim() == 1 and out.dtype == torch.float32
    assert abs(len(out) - len(wav)) <= 320 and out.abs().max() <= 1.0


def test_round_trip_close_and_more_layers_help(codec):
    """decode(encode(x)) is close to x in log-mel, and every extra layer lowers the distance.

    Bound: 0.6 nats mean absolute log-mel error after Griffin-Lim (the codes alone reach ~0.3 here; a
    silent output would be ~5). Distances are measured on held-out signals the codebooks never saw.
    """
    dists, code_dists = [], []
    for seed, f0 in [(50, 130), (51, 210)]:
        wav = voice(2.0, f0, seed)
        ref, codes = codec.log_mel(wav, SR), codec.encode(wav, SR)
        dists.append([log_mel_distance(codec.log_mel(*codec.decode(codes[:q])), ref) for q in range(1, 5)])
        code_dists.append([log_mel_distance(codec.decode_log_mel(codes[:q]), ref) for q in range(1, 5)])
    for d, cd in zip(dists, code_dists):
        assert d[-1] < 0.6
        assert all(a > b for a, b in zip(cd, cd[1:])), cd  # every prefix decodes; more layers, closer
        assert d[-1] < d[0]


def test_encode_matches_independent_quantiser(codec):
    """Residual quantisation checked against a direct float64 nearest-centroid search, layer by layer."""
    wav = voice(1.0, 170, seed=7)
    x = codec.log_mel(wav, SR).T.double()
    y = x - x.mean(0)  # layer 1 sees the utterance-mean-normalised frame (cmn=True)
    expect = []
    for q, cent in enumerate(codec.centroids):
        cent = cent.double()
        idx = torch.cdist(y, cent).argmin(1)
        expect.append(idx)
        y = (x - codec.mean.double() if q == 0 else y) - cent[idx]
    assert torch.equal(codec.encode(wav, SR), torch.stack(expect))


def test_fit_is_deterministic_and_seed_matters():
    train = [(voice(1.0, f0, seed), SR) for seed, f0 in enumerate([110, 180, 250])]
    a = MelRVQCodec.fit(train, card=(16, 8), iters=5, seed=3)
    b = MelRVQCodec.fit(train, card=(16, 8), iters=5, seed=3)
    c = MelRVQCodec.fit(train, card=(16, 8), iters=5, seed=4)
    assert a.name == b.name and all(torch.equal(x, y) for x, y in zip(a.centroids, b.centroids))
    assert a.name != c.name
    wav = voice(1.0, 150, seed=11)
    assert torch.equal(a.encode(wav, SR), b.encode(wav, SR))


def test_kmeans_finds_separated_clusters_and_uses_every_code():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2, generator=g) for c in centres])
    cent = kmeans(x, 4, iters=10, seed=1)
    found = sorted(cent.round().tolist())
    assert found == sorted(centres.tolist())
    # more clusters than natural groups: no cluster stays empty (dead codes are re-seeded)
    cent = kmeans(x, 12, iters=10, seed=1)
    counts = torch.bincount(torch.cdist(x, cent).argmin(1), minlength=12)
    assert (counts > 0).all()


def test_stereo_is_down_mixed_and_resampled(codec):
    wav = voice(1.0, 160, seed=5)
    stereo = torch.stack([wav, 0.5 * wav])
    assert torch.equal(codec.encode(stereo, SR), codec.encode(0.75 * wav, SR))
    wav48 = torch.nn.functional.interpolate(wav.view(1, 1, -1), scale_factor=3, mode="linear")[0, 0]
    assert codec.encode(wav48, 48000).shape == codec.encode(wav, SR).shape


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(0), "empty"),
    (torch.tensor([0.1, float("nan"), 0.2] * 400), "NaN"),
    (torch.zeros(1, 2, 1600), "1-D"),
    (torch.zeros(1600, dtype=torch.int16), "floating point"),
])
def test_bad_audio_is_refused(codec, bad, match):
    with pytest.raises(ValueError, match=match):
        codec.encode(bad, SR)


def test_bad_codes_are_refused(codec):
    with pytest.raises(ValueError, match="layer 2 codes"):
        codec.decode(torch.tensor([[0, 1], [32, 0]]))  # layer 2 has 32 entries
    with pytest.raises(ValueError, match=r"\[q, T\]"):
        codec.decode(torch.zeros(5, 10, dtype=torch.long))  # more layers than the codec has
    with pytest.raises(ValueError, match="integers"):
        codec.decode(torch.full((1, 10), 1.7))  # floats would be truncated silently


def test_save_load_round_trip(codec, tmp_path):
    path = tmp_path / "codec.pt"
    codec.save(path)
    again = MelRVQCodec.load(path)  # torch.load(weights_only=True) inside
    wav = voice(1.0, 190, seed=8)
    assert again.name == codec.name and again.card == codec.card
    assert torch.equal(again.encode(wav, SR), codec.encode(wav, SR))
    with pytest.raises(FileNotFoundError, match="fit_toy_codec"):
        MelRVQCodec.load(tmp_path / "missing.pt")


def test_envelope_projection_is_the_dct_lowpass():
    """The envelope projection equals keeping the first k orthonormal DCT-II coefficients (scipy's DCT, an
    independent computation), and it is a projection: symmetric and idempotent."""
    fft = pytest.importorskip("scipy.fft")
    from codec import envelope_projection

    assert envelope_projection(80, 0) is None
    P = envelope_projection(80, 24).double()
    x = torch.randn(5, 80, dtype=torch.float64)
    c = fft.dct(x.numpy(), type=2, norm="ortho", axis=-1)
    c[:, 24:] = 0
    expected = torch.from_numpy(fft.idct(c, type=2, norm="ortho", axis=-1))
    torch.testing.assert_close(x @ P, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(P, P.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=0)


def test_envelope_layer1_codes_by_envelope_and_round_trips(tmp_path):
    """With envelope=K, layer 1's code is the entry whose *envelope* is nearest the frame's envelope (checked by
    brute force in float64), its table entry is a full frame, and layer 2 codes the full residual. The codec
    saves and loads with its envelope. (Whether it helps is measured on speech: data/README.md.)"""
    from codec import envelope_projection

    train = [(voice(1.5, f0, seed), SR) for seed, f0 in enumerate([110, 140, 180, 220, 260, 120, 200, 240])]
    env = MelRVQCodec.fit(train, card=(32, 16), iters=10, seed=0, envelope=12)
    wav = voice(2.0, 170, seed=33)
    x = env.log_mel(wav, SR).T.double()
    P, c1 = envelope_projection(env.n_mels, 12).double(), env.centroids[0].double()
    want = (((x - x.mean(0)) @ P).unsqueeze(1) - (c1 @ P).unsqueeze(0)).pow(2).sum(-1).argmin(1)
    codes = env.encode(wav, SR)
    assert (codes[0] == want).float().mean() > 0.99
    residual = (x - env.mean.double()) - c1[codes[0]]
    want2 = (residual.unsqueeze(1) - env.centroids[1].double().unsqueeze(0)).pow(2).sum(-1).argmin(1)
    assert (codes[1] == want2).float().mean() > 0.99
    assert not torch.allclose(c1 @ P, c1, atol=1e-3)  # the table holds full frames, not envelopes
    env.save(tmp_path / "c.pt")
    back = MelRVQCodec.load(tmp_path / "c.pt")
    assert back.envelope == 12 and back.name == env.name and "-env12" in back.name
    assert torch.equal(back.encode(wav, SR), codes)


def test_expected_upper_layers_decode_like_codes(codec):
    """decode_log_mel(layer 1, upper=sum_j p_j @ tables[j]) with one-hot p_j (the codes' own) gives the log-mel of
    all layers, a second path (table lookups); soft p_j give the hand sum; decode vocodes that log-mel. (Two
    log-mels 1e-6 apart give waveforms up to ~2e-3 apart: Griffin-Lim is not compared across them.)"""
    codes = codec.encode(voice(1.0, 170, seed=9), SR)
    tables = codec.tables()
    assert [t.shape for t in tables] == [(n, codec.n_mels) for n in codec.card]
    onehot = sum(torch.nn.functional.one_hot(codes[j], codec.card[j]).float() @ tables[j] for j in range(1, 4))
    torch.testing.assert_close(codec.decode_log_mel(codes[:1], upper=onehot), codec.decode_log_mel(codes),
                               atol=1e-5, rtol=0)
    assert (codec.decode_log_mel(codes[:1]) - codec.decode_log_mel(codes)).abs().max() > 0.1  # upper matters
    assert torch.equal(codec.decode(codes[:1], upper=onehot)[0],
                       codec.vocode(codec.decode_log_mel(codes[:1], upper=onehot))[0])
    p = torch.rand(codes.shape[1], codec.card[1], dtype=torch.float64).softmax(-1)
    want = codec.mean.double() + tables[0].double()[codes[0]] + p @ tables[1].double()  # float64, by hand
    got = codec.decode_log_mel(codes[:1], upper=(p @ tables[1].double()).float())
    torch.testing.assert_close(got.T.double(), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"upper must be a float \[T, D\]"):
        codec.decode(codes[:1], upper=onehot[:-1])


@pytest.mark.parametrize("f0", [90.0, 150.0, 233.0])
def test_median_f0_finds_the_pitch_of_a_sawtooth_and_none_in_silence_or_noise(f0):
    t = torch.arange(SR) / SR
    saw = ((t * f0) % 1.0 - 0.5).float()  # every harmonic of f0, period SR / f0 samples
    assert median_f0(saw, SR) == pytest.approx(f0, rel=0.02)
    assert median_f0(voice(1.0, f0, seed=3), SR) == pytest.approx(f0, rel=0.1)  # its pitch drifts by +-10%
    assert median_f0(torch.zeros(SR), SR) is None
    assert median_f0(0.1 * torch.randn(SR, generator=torch.Generator().manual_seed(0)), SR) is None


def test_source_filter_speaks_at_its_pitch_with_the_log_mels_envelope(codec):
    """The source-filter decoder's output, analysed again by the codec's own front end and median_f0: its pitch
    is the f0 asked for, whatever pitch the log-mel came from, and its smooth envelope follows the log-mel's (a
    4-nat formant bump added to the input comes out as a bump at the same bins, not elsewhere)."""
    lm = codec.log_mel(voice(1.0, 210, seed=5), SR)
    bump = torch.zeros(codec.n_mels, 1)
    bump[20:30] = 4.0
    wav, sr = codec.vocode(lm, f0=130.0)
    assert sr == SR and wav.shape == ((lm.shape[1] - 1) * 320,) and wav.abs().max() <= 1.0
    assert median_f0(wav, sr) == pytest.approx(130.0, rel=0.03)
    smooth = envelope_projection(codec.n_mels, 24)
    plain, bumped = (smooth @ codec.log_mel(codec.vocode(x, f0=130.0)[0], SR) for x in (lm, lm + bump))
    rise = (bumped - plain).mean(1)  # per bin, over frames; levels are relative (the peak is normalised)
    assert rise[20:30].mean() - rise[40:].mean() > 2.0
    assert (rise[:10].mean() - rise[40:].mean()).abs() < 0.5
    assert torch.equal(codec.vocode(lm, f0=130.0)[0], wav)  # seeded noise: one log-mel, one waveform
    codes = codec.encode(voice(1.0, 170, seed=9), SR)
    assert torch.equal(decode_codes(codec, codes, f0=130.0)[0], codec.vocode(codec.decode_log_mel(codes), 130.0)[0])
    assert codec.prompt_f0(codes) == median_f0(*codec.decode(codes))  # Griffin-Lim keeps the codes' harmonics
    with pytest.raises(ValueError, match="f0 must be a pitch in Hz"):
        codec.vocode(lm, f0=0.0)
