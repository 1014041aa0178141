"""Speech-like test signals, so codec and data tests need no audio files."""
import math

import torch

SR = 16000


def voice(seconds, f0, seed):
    """A speech-like test signal: a harmonic tone whose pitch and vowel-like envelope drift over time."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    pitch = f0 * (1 + 0.1 * torch.sin(2 * math.pi * 0.7 * t))
    phase = 2 * math.pi * torch.cumsum(pitch, 0) / SR
    formant = 500 + 1500 * torch.rand(1, generator=g) * (1 + torch.sin(2 * math.pi * 1.3 * t + seed))
    wav = sum(torch.sin(k * phase) * torch.exp(-((k * pitch - formant) / 600) ** 2) for k in range(1, 30))
    return 0.3 * wav / wav.abs().max() + 0.003 * torch.randn(len(t), generator=g)
