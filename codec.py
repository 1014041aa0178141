"""Neural-codec interface shared by the real and the toy setting.

A codec turns a waveform into Q parallel token streams ("layers") at a fixed frame rate and back:

    codes = codec.encode(wav, sr)      # LongTensor [Q, T]; wav is [N] or [C, N] (channels are averaged)
    wav, sr = codec.decode(codes)      # any prefix of layers, codes[:q], decodes
    wav, sr = codec.decode(codes[:1], upper=u)  # layer 1 + a float [T, D] in the space of the layers' vectors
    tables = codec.tables()            # per layer its float table [card_q, D]: what each code decodes to

`upper` lets a decoder take what the layers' tables are summed into from elsewhere than codes: the NAR's expected
upper-layer vectors, sum_j sum_c p_j(c) * tables[j][c] (speechalign.NAR.generate).

Attributes: `name` (written into every tokenised file so that codes from two codecs are never mixed),
`n_q` (layers), `card` (codebook size of each layer, a tuple of n_q ints), `frame_rate` (frames per
second), `sample_rate` (of `decode`'s output).

Two codecs:
- `EncodecCodec`: pretrained EnCodec 24 kHz at 6 kbps, 8 x 1024 codes at 75 Hz (the real setting, as
  in VALL-E). Its weights come from a hub; offline, place the file as the error message says.
- `MelRVQCodec`: the toy codec for offline CPU work. 80-bin log-mel at 50 frames/s, quantised by
  residual k-means, decoded by inverse mel + Griffin-Lim or by a source-filter decoder at a given pitch
  (`vocode`). See its docstring for the layout.
"""
import hashlib
import math
import os
import pickle
from pathlib import Path

import torch
import torchaudio

ENCODEC_FILE = "encodec_24khz-d7cc33bc.th"
SOURCE_FILTER_ENVELOPE = 24  # mel-cosines of the source-filter decoder's filter (layer 1's envelope, --envelope 24)
VOICED_BELOW = 2000.0  # Hz: the source-filter decoder's pulses give way to noise around here (chosen on dev)
F0_FALLBACK = 120.0  # Hz: the source-filter pitch for a prompt with no voiced frame


def load_pt(path, what, map_location="cpu", mmap=False):
    """torch.load(weights_only=True) of a file this project wrote (checkpoint, codec, tokenised corpus, pairs).
    A file cut short (an interrupted copy or download) or damaged makes PyTorch raise a bare "failed
    finding central directory" or the like that names no file: say which file, and what is wrong with it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: this {what} file is incomplete or corrupt (cut short by an interrupted copy "
                         "or download?), or not one this project wrote") from e


def atomic_write(path, write):
    """write(tmp) fills a temporary file beside `path`, then one rename puts it in place: a run killed or
    failing mid-write leaves the old file (or none) and no temporary, never half a file. Every file the
    project writes goes through here."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: no stray temporary
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_wav(path, wav, sr):
    """16-bit PCM WAV of a float waveform, clamped to [-1, 1] (int16 would wrap a sample past 1 around)."""
    import soundfile as sf
    atomic_write(path, lambda tmp: sf.write(tmp, wav.clamp(-1, 1).numpy(), sr, format="WAV", subtype="PCM_16"))


def as_mono(wav, sr, target_sr):
    """Check and convert audio to a 1-D float32 tensor at target_sr. Accepts [N] or [C, N] (C channels)."""
    wav = torch.as_tensor(wav)
    if not torch.is_floating_point(wav):
        raise ValueError(f"audio must be floating point in [-1, 1], got dtype {wav.dtype}")
    if wav.dim() not in (1, 2):
        raise ValueError(f"audio must be 1-D [samples] or 2-D [channels, samples], got shape {tuple(wav.shape)}")
    if wav.numel() == 0:
        raise ValueError("audio is empty")
    if not torch.isfinite(wav).all():
        raise ValueError("audio contains NaN or infinite samples")
    if not isinstance(sr, int) or sr <= 0:
        raise ValueError(f"sample rate must be a positive int, got {sr!r}")
    wav = wav.float()
    if wav.dim() == 2:
        wav = wav.mean(0)  # down-mix
    if sr != target_sr:
        wav = torchaudio.functional.resample(wav, sr, target_sr)
    return wav


class EncodecCodec:
    """Pretrained EnCodec 24 kHz at 6 kbps: 8 codebooks x 1024 entries at 75 frames/s.

    `model` lets tests pass an EnCodec built without pretrained weights; by default the pretrained one is
    loaded (from $TORCH_HOME/hub/checkpoints/, downloaded there if the hub can be reached).
    """

    def __init__(self, bandwidth=6.0, device="cpu", model=None):
        from encodec import EncodecModel

        if model is None:
            hub_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
            try:
                model = EncodecModel.encodec_model_24khz(pretrained=True)
            except Exception as e:  # URLError, HTTPError, a truncated download...
                raise RuntimeError(
                    f"could not load the pretrained EnCodec 24 kHz weights ({type(e).__name__}: {e}). "
                    f"To work offline, place {ENCODEC_FILE} in {hub_dir}/ "
                    f"(or set TORCH_HOME so that $TORCH_HOME/hub/checkpoints/{ENCODEC_FILE} exists)."
                ) from e
        model.set_target_bandwidth(bandwidth)
        self.model = model.to(device).eval()
        self.device = device
        self.sample_rate = model.sample_rate
        self.frame_rate = math.ceil(model.sample_rate / math.prod(model.encoder.ratios))
        self.n_q = model.quantizer.get_num_quantizers_for_bandwidth(model.frame_rate, bandwidth)
        self.card = (model.quantizer.bins,) * self.n_q
        self.name = f"encodec_24khz_{bandwidth:g}kbps"

    def params(self):
        return {"bandwidth": self.model.bandwidth}

    @torch.no_grad()  # not inference_mode: inference tensors refuse in-place edits and autograd
    def encode(self, wav, sr):
        wav = as_mono(wav, sr, self.sample_rate)
        frames = self.model.encode(wav.view(1, 1, -1).to(self.device))
        return torch.cat([codes for codes, _ in frames], dim=-1)[0].long().cpu()  # [Q, T]

    @torch.no_grad()
    def encode_batch(self, wavs, sr):
        """Encode equal-length waveforms [B, N] at once -> [B, Q, T]."""
        wavs = [as_mono(w, sr, self.sample_rate) for w in wavs]
        if len({len(w) for w in wavs}) != 1:
            raise ValueError(f"encode_batch needs equal-length waveforms, got lengths {sorted({len(w) for w in wavs})}")
        wavs = torch.stack(wavs)
        frames = self.model.encode(wavs.unsqueeze(1).to(self.device))
        return torch.cat([codes for codes, _ in frames], dim=-1).long().cpu()

    def tables(self):
        """Each layer's codebook [1024, 128] in EnCodec's latent space (what the decoder reads)."""
        return [layer.project_out(layer._codebook.embed).detach().cpu()
                for layer in self.model.quantizer.vq.layers[:self.n_q]]

    @torch.no_grad()
    def decode(self, codes, upper=None):
        """Codes [q, T] -> (waveform, 24000); `upper` [T, 128] is added to the sum of their codebook vectors."""
        codes = _check_codes(codes, self.card)
        if upper is None:
            wav = self.model.decode([(codes.unsqueeze(0).to(self.device), None)])
        else:  # EncodecModel._decode_frame with the latent changed (the 24 kHz model has no segments or scale)
            latent = self.model.quantizer.decode(codes.unsqueeze(1).to(self.device))  # [1, 128, T]
            latent = latent + _check_upper(upper, codes.shape[1], latent.shape[1]).T.to(latent)
            wav = self.model.decoder(latent)
        return wav[0, 0].cpu(), self.sample_rate


def _check_upper(upper, frames, dim):
    upper = torch.as_tensor(upper)
    if not torch.is_floating_point(upper) or upper.shape != (frames, dim):
        raise ValueError(f"upper must be a float [T, D] = [{frames}, {dim}] tensor (the codes' frames, the tables' "
                         f"width), got {upper.dtype} {tuple(upper.shape)}")
    if not torch.isfinite(upper).all():
        raise ValueError("upper contains NaN or infinite values")
    return upper.float()


def _check_codes(codes, card):
    codes = torch.as_tensor(codes)
    if torch.is_floating_point(codes) or codes.dtype == torch.bool:
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.dim() != 2 or not 1 <= codes.shape[0] <= len(card) or codes.shape[1] == 0:
        raise ValueError(f"codes must be [q, T] with 1 <= q <= {len(card)} and T > 0, got {tuple(codes.shape)}")
    codes = codes.long()
    for q in range(codes.shape[0]):
        if codes[q].min() < 0 or codes[q].max() >= card[q]:
            raise ValueError(f"layer {q + 1} codes must lie in [0, {card[q]}), "
                             f"got [{codes[q].min()}, {codes[q].max()}]")
    return codes


def kmeans(x, k, iters=20, seed=0, chunk=65536):
    """Lloyd's k-means on rows of x [N, D] -> centroids [k, D]; deterministic for a seed.

    Initialised from k distinct random rows; a cluster that empties is re-seeded with the row that is
    currently worst represented, so every code stays in use.
    """
    gen = torch.Generator().manual_seed(seed)
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least k={k} frames, got {x.shape[0]}")
    cent = x[torch.randperm(x.shape[0], generator=gen)[:k]].clone()
    for _ in range(iters):
        assign, err = _nearest(x, cent, chunk)
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        cent = sums / counts.clamp(min=1).unsqueeze(1)
        if len(empty):
            cent[empty] = x[err.topk(len(empty)).indices]
    return cent


def _nearest(x, cent, chunk=65536):
    """Index of the nearest centroid for each row of x, and the squared distance to it."""
    c2 = (cent * cent).sum(1)
    idx, err = [], []
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        d = (xb * xb).sum(1, keepdim=True) - 2 * xb @ cent.T + c2
        m = d.min(1)
        idx.append(m.indices)
        err.append(m.values.clamp(min=0))
    return torch.cat(idx), torch.cat(err)


def envelope_projection(n_mels, k):
    """[n_mels, n_mels] projection of a log-mel frame on its first k DCT-II cosines (a smooth envelope without
    pitch harmonics); None for k = 0. Orthonormal rows, so the projection is symmetric and idempotent."""
    if not k:
        return None
    n = torch.arange(n_mels, dtype=torch.float64)
    basis = torch.cos(torch.pi / n_mels * (n + 0.5) * n[:k].unsqueeze(1))  # [k, n_mels]
    basis = basis / basis.norm(dim=1, keepdim=True)
    return (basis.T @ basis).float()


class MelRVQCodec:
    """The toy codec: 16 kHz log-mel (n_fft 1024, hop 320 -> 50 frames/s; 80 or 128 bins), residual k-means.

    Encoding: frames x_t (log-mel, natural log) are quantised layer by layer. Layer 1 clusters
    x_t - mu_utt, the frame minus its utterance's mean log-mel (cepstral mean normalisation), so layer 1
    holds *what is said* largely independent of the voice, as SpeechTokenizer's first layer does (the
    codec the paper used). Layers 2..Q cluster what the layers below leave of x_t - m (m: the corpus
    mean), which includes the speaker's spectral colour mu_utt - m: a part the NAR can learn from the
    acoustic prompt. With `cmn=False` layer 1 clusters x_t - m as plain residual k-means does.
    With `envelope=K`, layer 1 chooses its code by the smooth spectral envelope only -- the frame
    projected on the first K cosines over mel bins, which removes the pitch harmonics -- so that one
    vowel said at two pitches gets one code (layer-1 codes are spent on phones, not on pitch); the code's
    table entry is still the mean full frame of its cluster, and the harmonics are left to layers 2..Q.
    Decoding: m + sum of the centroids of the given layers, inverse mel, then Griffin-Lim or, given a pitch, a
    source-filter decoder (`vocode`). Every prefix of layers decodes. data/README.md has the measurements
    behind the default layout.
    """

    sample_rate = 16000
    frame_rate = 50
    n_fft, hop = 1024, 320

    def __init__(self, centroids, mean, cmn=True, envelope=0, griffin_lim_iters=32):
        self.centroids = [c.float() for c in centroids]  # per layer [card_q, n_mels]
        self.mean = mean.float()  # [n_mels]
        self.n_mels = self.mean.numel()  # 80 or 128 (the bins are the codebooks' width, so files need no field)
        self.cmn = bool(cmn)
        self.envelope = int(envelope)
        self.smooth = envelope_projection(self.n_mels, self.envelope)  # [n_mels, n_mels], or None
        self.griffin_lim_iters = griffin_lim_iters
        self.n_q = len(self.centroids)
        self.card = tuple(c.shape[0] for c in self.centroids)
        self.mel = torchaudio.transforms.MelSpectrogram(
            self.sample_rate, n_fft=self.n_fft, hop_length=self.hop, n_mels=self.n_mels, power=1.0)
        self._inv = None  # decoder transforms, built on first decode
        digest = torch.cat([c.flatten() for c in self.centroids] + [self.mean]).numpy().tobytes()
        tag = hashlib.sha1(digest).hexdigest()[:8]
        mels = "" if self.n_mels == 80 else f"-mel{self.n_mels}"  # 80-bin codecs keep their earlier names
        env = f"-env{self.envelope}" if self.envelope else ""
        self.name = f"melrvq16k{mels}-{'x'.join(map(str, self.card))}{'-cmn' if self.cmn else ''}{env}-{tag}"

    def params(self):
        return {"n_fft": self.n_fft, "hop": self.hop, "n_mels": self.n_mels, "cmn": self.cmn,
                "envelope": self.envelope, "card": list(self.card), "sample_rate": self.sample_rate,
                "frame_rate": self.frame_rate}

    # --- features ------------------------------------------------------------------------------------
    def log_mel(self, wav, sr):
        """[n_mels, T] natural-log mel magnitudes of (mono, resampled) audio; floor 1e-5."""
        wav = as_mono(wav, sr, self.sample_rate)
        return self.mel(wav).clamp(min=1e-5).log()

    # --- fit -----------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, wavs, card=(1024, 256, 256, 256, 256, 256, 256, 256), cmn=True, seed=0, iters=20,
            max_frames=400_000, n_mels=80, envelope=0, progress=False):
        """Fit the codebooks on an iterable of (wav, sr); deterministic for a seed and input order."""
        probe = cls([torch.zeros(1, n_mels)], torch.zeros(n_mels), cmn=cmn)
        feats = [probe.log_mel(w, sr).T for w, sr in wavs]  # each [T, n_mels]
        if not feats:
            raise ValueError("MelRVQCodec.fit got no audio")
        x = torch.cat(feats)
        mean = x.mean(0)
        y = torch.cat([f - f.mean(0) for f in feats]) if cmn else x - mean
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(x.shape[0], generator=gen)[:max_frames]
        x, y = x[keep], y[keep]
        centroids = []
        layers = range(len(card))
        if progress:
            from tqdm import tqdm
            layers = tqdm(layers, desc="fit layers")
        smooth = envelope_projection(n_mels, envelope)
        for q in layers:
            if q == 0 and smooth is not None:  # cluster envelopes; each table entry is its cluster's mean frame
                idx = _nearest(y @ smooth, kmeans(y @ smooth, card[0], iters=iters, seed=seed))[0]
                counts = torch.bincount(idx, minlength=card[0]).unsqueeze(1)
                cent = torch.zeros(card[0], n_mels).index_add_(0, idx, y) / counts.clamp(min=1)
            else:
                cent = kmeans(y, card[q], iters=iters, seed=seed + q)
                idx = _nearest(y, cent)[0]
            centroids.append(cent)
            # layers 2..Q code what layer 1 leaves of the frame itself, voice included
            y = ((x - mean) if q == 0 else y) - cent[idx]
        return cls(centroids, mean, cmn=cmn, envelope=envelope)

    # --- encode / decode -----------------------------------------------------------------------------
    def encode(self, wav, sr):
        """Audio [N] or [C, N] at rate sr -> codes LongTensor [Q, T], T = 1 + N_16k // 320."""
        x = self.log_mel(wav, sr).T  # [T, n_mels]
        y = x - (x.mean(0) if self.cmn else self.mean)
        codes = []
        for q, cent in enumerate(self.centroids):
            if q == 0 and self.smooth is not None:
                idx = _nearest(y @ self.smooth, cent @ self.smooth)[0]
            else:
                idx = _nearest(y, cent)[0]
            codes.append(idx)
            y = ((x - self.mean) if q == 0 else y) - cent[idx]
        return torch.stack(codes)

    def tables(self):
        """Each layer's centroids [card_q, n_mels]: log-mel offsets, summed around `mean`."""
        return self.centroids

    def decode_log_mel(self, codes, upper=None):
        """Codes [q, T] (any prefix of layers) -> log-mel [n_mels, T]; `upper` [T, n_mels] is added."""
        codes = _check_codes(codes, self.card)
        y = self.mean.unsqueeze(0).expand(codes.shape[1], -1)
        for q in range(codes.shape[0]):
            y = y + self.centroids[q][codes[q]]
        if upper is not None:
            y = y + _check_upper(upper, codes.shape[1], self.n_mels)
        return y.T

    def decode(self, codes, upper=None, f0=None):
        """Codes [q, T] (and `upper`, as decode_log_mel) -> (waveform [ (T-1)*320 ] float32 at 16 kHz, 16000).
        f0: None for Griffin-Lim, or a pitch in Hz for the source-filter decoder (`vocode`)."""
        return self.vocode(self.decode_log_mel(codes, upper), f0)

    def prompt_f0(self, prompt):
        """The pitch (Hz) at which the source-filter decoder speaks for a speaker: the median F0 of the prompt's
        codes [Q, Lp] heard through Griffin-Lim (all their layers carry the harmonics), or F0_FALLBACK."""
        return median_f0(*self.decode(prompt)) or F0_FALLBACK

    def vocode(self, log_mel, f0=None):
        """Log-mel [n_mels, T] -> (waveform, 16000). Applied to an unquantised log-mel it measures the vocoder
        alone (data/measure_codec.py's "mel" system).

        f0 None: inverse mel filterbank, then Griffin-Lim. It inverts what the codes hold, harmonics included,
        but where they hold none (layer 1 alone, or the NAR's expected upper layers, averages over pitches) it
        finds a rough, whisper-like signal that the ASR reads badly.
        f0 in Hz: a source-filter decoder (a channel vocoder). The filter is the frame's smooth envelope (its
        first SOURCE_FILTER_ENVELOPE mel-cosines, as layer 1 codes it) through the inverse mel filterbank; the
        source is a pulse train at f0 below about VOICED_BELOW Hz, mixed into noise above it, its phase the
        excitation's own. It speaks every frame at one pitch, the speaker's (`prompt_f0`), so it loses the
        intonation that the codes may hold. data/README.md has the measurements of both."""
        if self._inv is None:
            self._inv = (
                torchaudio.transforms.InverseMelScale(self.n_fft // 2 + 1, self.n_mels, self.sample_rate),
                torchaudio.transforms.GriffinLim(self.n_fft, n_iter=self.griffin_lim_iters,
                                                 hop_length=self.hop, power=1.0, rand_init=False),
                envelope_projection(self.n_mels, SOURCE_FILTER_ENVELOPE),
            )
        inv_mel, griffin_lim, smooth = self._inv
        if f0 is None:
            wav = griffin_lim(inv_mel(log_mel.exp()))
        else:  # the filter: each frame's envelope as linear magnitudes [bins, T]
            wav = self._source_filter(inv_mel((smooth @ log_mel).exp()).clamp(min=0), f0)
        peak = wav.abs().max()
        return (wav / peak * 0.95 if peak > 1 else wav), self.sample_rate

    def _source_filter(self, filt, f0):
        if not 30 <= f0 <= 1000:
            raise ValueError(f"f0 must be a pitch in Hz within [30, 1000], got {f0}")
        frames = filt.shape[1]
        n = (frames - 1) * self.hop
        t = torch.arange(n, dtype=torch.float64)
        cycle = torch.floor(t * f0 / self.sample_rate)
        pulses = torch.cat([torch.ones(1), (cycle[1:] > cycle[:-1]).float()])  # one at the start of each period
        noise = torch.randn(n, generator=torch.Generator().manual_seed(0))  # seeded: a decode is repeatable
        window = torch.hann_window(self.n_fft)

        def flat(sig):  # each frame's spectrum scaled to unit mean power, so that the filter sets the level
            spec = torch.stft(sig, self.n_fft, self.hop, window=window, return_complex=True)[:, :frames]
            return spec / spec.abs().pow(2).mean(0, keepdim=True).sqrt().clamp(min=1e-8)

        freq = torch.linspace(0, self.sample_rate / 2, self.n_fft // 2 + 1).unsqueeze(1)
        voiced = 1 / (1 + (freq / VOICED_BELOW) ** 4)  # power-complementary crossover into noise
        source = voiced * flat(pulses) + (1 - voiced ** 2).sqrt() * flat(noise)
        return torch.istft(source * filt, self.n_fft, self.hop, window=window, length=n)

    # --- save / load ---------------------------------------------------------------------------------
    def save(self, path):
        """Atomic save (temp file, then rename) of everything `load` needs; plain tensors and lists."""
        state = {"name": self.name, "cmn": self.cmn, "envelope": self.envelope, "mean": self.mean, "centroids": self.centroids,
                 "params": self.params()}
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    @classmethod
    def load(cls, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no toy codec at {path} (fit one with data/fit_toy_codec.py)")
        state = load_pt(path, "toy codec")
        codec = cls(state["centroids"], state["mean"], cmn=state["cmn"], envelope=state.get("envelope", 0))
        if codec.name != state["name"]:
            raise ValueError(f"{path}: codebooks do not match the stored name {state['name']} (corrupt file?)")
        return codec


def median_f0(wav, sr, fmin=60.0, fmax=400.0, threshold=0.5):
    """Median pitch (Hz) of the voiced 40 ms frames (hop 20 ms) of a waveform, or None if none is voiced. A frame
    is voiced where its normalised autocorrelation peaks above `threshold` at a lag within [1/fmax, 1/fmin]; quiet
    frames (below 1% of the loudest frame's power) are skipped."""
    wav = as_mono(wav, sr, 16000).double()
    size, hop = 640, 320
    if wav.numel() < size:
        return None
    frames = wav.unfold(0, size, hop)
    frames = frames - frames.mean(1, keepdim=True)
    power = frames.pow(2).mean(1)
    spec = torch.fft.rfft(frames, 2 * size)
    ac = torch.fft.irfft(spec.abs().pow(2), 2 * size)[:, :size]
    ac = ac / ac[:, :1].clamp(min=1e-12)
    lo, hi = int(16000 / fmax), int(16000 / fmin)
    peak, lag = ac[:, lo:hi + 1].max(1)
    voiced = (peak > threshold) & (power > 0.01 * power.max())
    if not voiced.any():
        return None
    return float((16000 / (lag[voiced] + lo).double()).median())


VOCODERS = ("auto", "griffin_lim", "source_filter")  # the choices of --vocoder (choose_vocoder)


def choose_vocoder(codec, vocoder):
    """eval.py's and synthesize.py's --vocoder: "auto" is the source-filter decoder for the toy codec (its default,
    chosen on dev: data/README.md) and None, the codec's own decoder, for EnCodec; "griffin_lim" and
    "source_filter" are the toy codec's two decoders (MelRVQCodec.vocode), refused for a codec without log-mels."""
    if vocoder == "auto":
        return "source_filter" if hasattr(codec, "prompt_f0") else None
    if not hasattr(codec, "prompt_f0"):
        raise ValueError(f"--vocoder {vocoder} decodes the toy codec's log-mels; codec {codec.name} has none")
    return vocoder


def load_codec(spec, device="cpu"):
    """'encodec' (the real setting, pretrained EnCodec 24 kHz) or the path of a fitted toy codec file."""
    return EncodecCodec(device=device) if spec == "encodec" else MelRVQCodec.load(spec)


def decode_codes(codec, codes, upper=None, f0=None):
    """Audio of codes [Q, T] (a tensor, or nested lists as the evaluation's cache holds them): all layers, or
    layer 1 + an upper part [T, D] (the NAR's expected upper layers, speechalign.NAR.generate). f0: the toy
    codec's source-filter pitch (MelRVQCodec.vocode); None decodes as the codec does by default."""
    codes = torch.as_tensor(codes)
    upper = None if upper is None else torch.as_tensor(upper).float()
    pitch = {} if f0 is None else {"f0": f0}  # EnCodec's decoder takes none
    return codec.decode(codes if upper is None else codes[:1], upper=upper, **pitch)


def log_mel_distance(a, b):
    """Mean absolute difference of two log-mels [n_mels, T] over their common frames (nats)."""
    t = min(a.shape[1], b.shape[1])
    return (a[:, :t] - b[:, :t]).abs().mean().item()


# --- tokenised corpora ----------------------------------------------------------------------------------
# A tokenised corpus is one file that torch.load(weights_only=True) reads: a dict with
#   "codec":  {"name", "n_q", "card", "frame_rate", "sample_rate", "params"}
#   "ids", "texts", "phonemes", "speakers": lists of str, one per utterance
#   "codes":  int16 [Q, sum of T] (every utterance's codes, concatenated in time)
#   "lengths": int64 [N] (frames per utterance; utterance i is codes[:, offsets[i]:offsets[i] + lengths[i]])
#   "source": the manifest it came from, and "skipped": [{"line", "id", "reason"}] for what was left out.

def codec_info(codec):
    return {"name": codec.name, "n_q": codec.n_q, "card": list(codec.card), "frame_rate": codec.frame_rate,
            "sample_rate": codec.sample_rate, "params": codec.params()}


def save_corpus(path, codec, rows, codes, source, skipped, **extra):
    """Write a tokenised corpus atomically. rows: dicts with id, text, phonemes, speaker; codes: [Q, T_i] each;
    extra: more keys to store (data/tokenize_corpus.py's shards keep the manifest rows they cover)."""
    corpus = extra | {
        "codec": codec_info(codec),
        "ids": [r["id"] for r in rows], "texts": [r["text"] for r in rows],
        "phonemes": [r.get("phonemes", "") for r in rows], "speakers": [r["speaker"] for r in rows],
        "codes": torch.cat(codes, dim=1).to(torch.int16) if codes else torch.zeros(codec.n_q, 0, dtype=torch.int16),
        "lengths": torch.tensor([c.shape[1] for c in codes], dtype=torch.long),
        "source": source, "skipped": skipped,
    }
    atomic_write(path, lambda tmp: torch.save(corpus, tmp))


def load_corpus(path):
    """Read a tokenised corpus; adds "utts": the list of per-utterance int64 codes [Q, T_i] (views)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenised corpus at {path} (make one with data/tokenize_corpus.py)")
    corpus = load_pt(path, "tokenised corpus")
    missing = {"codec", "ids", "texts", "phonemes", "speakers", "codes", "lengths"} - set(corpus)
    if missing:
        raise ValueError(f"{path} is not a tokenised corpus: missing {sorted(missing)}")
    codes = corpus["codes"].long()
    corpus["utts"] = list(codes.split(corpus["lengths"].tolist(), dim=1))
    return corpus
