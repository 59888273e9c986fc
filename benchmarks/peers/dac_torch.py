"""PyTorch peer of the codec GAN step: the Descript Audio Codec generator and discriminator.

DAC (Kumar et al., 2023, "High-Fidelity Audio Compression with Improved RVQGAN"), rebuilt module
for module from `descript-audio-codec` 1.0.0 (`dac/model/dac.py`, `dac/model/discriminator.py`,
`dac/nn/quantize.py`, `dac/nn/layers.py`) with the same `state_dict` keys and shapes, so DAC's
checkpoints load into it (`tests/test_peers.py` loads the reference `dac/tiny.pth` and matches
DAC's outputs, and checks every key of the released 44.1 kHz model).

Why a rebuild and not `import dac`: every module of `dac` imports descript-audiotools, which
imports torchaudio at import time; PyPI's torchaudio wheels link PyTorch's CUDA libraries and
stop at 2.11, so with the CPU wheel of torch 2.13 neither `import audiotools` nor `import dac`
succeeds. The step is therefore written against these classes with ldm_jax's loss set
(`cfg.loss_weights` of the codec experiment: DAC's multi-scale mel L1, LSGAN and feature
matching, commitment and codebook losses, plus the SI-SDR and waveform terms where weighted),
in DAC's order: a discriminator update on the detached reconstruction, then a generator update
against the updated discriminator. Differences from DAC's `train.py`: no data augmentation; the
zero-weighted multi-scale STFT loss DAC logs is not computed; Snake is plain PyTorch (DAC
scripts it with `torch.jit.script`; `compile=True` fuses it); the optional multi-scale wave
discriminator average-pools instead of sinc-resampling (as `ldm_jax.codec.discriminators`;
DAC's 44.1 kHz setup leaves it out).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.peers.timing import time_step

LEAKY_SLOPE = 0.1
BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
MEL_WINDOW_LENGTHS = (32, 64, 128, 256, 512, 1024, 2048)
MEL_N_MELS = (5, 10, 20, 40, 80, 160, 320)


class WNConv(nn.Module):
    """Weight-normalised conv with PyTorch's `weight_norm` parameter names (`weight_g`, norm dim 0).

    Attributes:
      rank: 1 or 2 spatial axes; `transpose` for a 1-D transposed conv.
    """

    def __init__(self, rank, c_in, c_out, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, transpose=False):
        super().__init__()
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank
        self.rank, self.transpose = rank, transpose
        self.stride, self.padding, self.dilation = pair(stride), pair(padding), pair(dilation)
        self.groups = groups
        kernel = pair(kernel_size)
        shape = (c_in, c_out // groups, *kernel) if transpose else (c_out, c_in // groups, *kernel)
        v = torch.empty(shape)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.weight_g = nn.Parameter(v.flatten(1).norm(dim=1).reshape(-1, *[1] * (v.ndim - 1)))
        self.weight_v = nn.Parameter(v)

    def forward(self, x):
        w = torch._weight_norm(self.weight_v, self.weight_g, 0)
        if self.transpose:
            return F.conv_transpose1d(x, w, self.bias, self.stride, self.padding, 0, self.groups,
                                      self.dilation)
        conv = F.conv1d if self.rank == 1 else F.conv2d
        return conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Snake1d(nn.Module):
    """x + sin(alpha x)^2 / alpha per channel (Ziyin et al., 2020), DAC's activation."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


# ----------------------------------------------------------------------------- generator

class ResidualUnit(nn.Module):
    def __init__(self, dim, dilation):
        super().__init__()
        self.block = nn.Sequential(Snake1d(dim), WNConv(1, dim, dim, 7, dilation=dilation,
                                                        padding=3 * dilation),
                                   Snake1d(dim), WNConv(1, dim, dim, 1))

    def forward(self, x):
        y = self.block(x)
        pad = (x.shape[-1] - y.shape[-1]) // 2
        return (x[..., pad:-pad] if pad > 0 else x) + y


class Block(nn.Module):
    """A sequence kept under the attribute `block`, as DAC's encoder and decoder blocks."""

    def __init__(self, *layers):
        super().__init__()
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return self.block(x)


def _encoder_block(dim, stride):
    return Block(ResidualUnit(dim // 2, 1), ResidualUnit(dim // 2, 3), ResidualUnit(dim // 2, 9),
                 Snake1d(dim // 2),
                 WNConv(1, dim // 2, dim, 2 * stride, stride, math.ceil(stride / 2)))


def _decoder_block(c_in, c_out, stride):
    return Block(Snake1d(c_in),
                 WNConv(1, c_in, c_out, 2 * stride, stride, math.ceil(stride / 2),
                        transpose=True),
                 ResidualUnit(c_out, 1), ResidualUnit(c_out, 3), ResidualUnit(c_out, 9))


class Encoder(nn.Module):
    def __init__(self, d_model, strides, d_latent):
        super().__init__()
        layers = [WNConv(1, 1, d_model, 7, padding=3)]
        for stride in strides:
            d_model *= 2
            layers.append(_encoder_block(d_model, stride))
        layers += [Snake1d(d_model), WNConv(1, d_model, d_latent, 3, padding=1)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return self.block(x)


class Decoder(nn.Module):
    def __init__(self, c_in, channels, rates):
        super().__init__()
        layers = [WNConv(1, c_in, channels, 7, padding=3)]
        for i, stride in enumerate(rates):
            layers.append(_decoder_block(channels // 2**i, channels // 2**(i + 1), stride))
        out = channels // 2 ** len(rates)
        layers += [Snake1d(out), WNConv(1, out, 1, 7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class VectorQuantize(nn.Module):
    """Factorised, L2-normalised codebook lookup with a straight-through estimator."""

    def __init__(self, input_dim, codebook_size, codebook_dim):
        super().__init__()
        self.in_proj = WNConv(1, input_dim, codebook_dim, 1)
        self.out_proj = WNConv(1, codebook_dim, input_dim, 1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def forward(self, z):
        z_e = self.in_proj(z)
        enc = F.normalize(z_e.transpose(1, 2).flatten(0, 1).float())
        book = F.normalize(self.codebook.weight.float())
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ book.t() + \
            book.pow(2).sum(1, keepdim=True).t()
        indices = (-dist).max(1)[1].reshape(z.shape[0], -1)
        z_q = F.embedding(indices, self.codebook.weight).transpose(1, 2).to(z_e.dtype)
        commitment = F.mse_loss(z_e, z_q.detach(), reduction="none").float().mean([1, 2])
        codebook = F.mse_loss(z_q, z_e.detach(), reduction="none").float().mean([1, 2])
        z_q = self.out_proj(z_e + (z_q - z_e).detach())
        return z_q, commitment, codebook, indices, z_e


class ResidualVectorQuantize(nn.Module):
    """Residual VQ with DAC's per-example quantizer dropout in training."""

    def __init__(self, input_dim, n_codebooks, codebook_size, codebook_dim, quantizer_dropout):
        super().__init__()
        self.n_codebooks, self.quantizer_dropout = n_codebooks, quantizer_dropout
        self.quantizers = nn.ModuleList([VectorQuantize(input_dim, codebook_size, codebook_dim)
                                         for _ in range(n_codebooks)])

    def forward(self, z):
        """z [B, D, T] -> (z_q, codes [B, N, T], latents, commitment loss, codebook loss)."""
        batch = z.shape[0]
        n_q = torch.full((batch,), self.n_codebooks + 1, device=z.device)
        if self.training:
            n_drop = int(batch * self.quantizer_dropout)
            n_q[:n_drop] = torch.randint(1, self.n_codebooks + 1, (n_drop,), device=z.device)
        else:
            n_q.fill_(self.n_codebooks)
        z_q, residual, commitment, codebook, codes, latents = 0, z, 0, 0, [], []
        for i, quantizer in enumerate(self.quantizers):
            z_q_i, commit_i, book_i, idx_i, z_e_i = quantizer(residual)
            mask = i < n_q
            z_q = z_q + z_q_i * mask[:, None, None]
            residual = residual - z_q_i
            commitment = commitment + (commit_i * mask).mean()
            codebook = codebook + (book_i * mask).mean()
            codes.append(idx_i)
            latents.append(z_e_i)
        return z_q, torch.stack(codes, 1), torch.cat(latents, 1), commitment, codebook


class Generator(nn.Module):
    """DAC's `DAC` module (constructor arguments and state-dict keys as in `dac.model.DAC`)."""

    def __init__(self, encoder_dim=64, encoder_rates=(2, 4, 8, 8), latent_dim=None,
                 decoder_dim=1536, decoder_rates=(8, 8, 4, 2), n_codebooks=9,
                 codebook_size=1024, codebook_dim=8, quantizer_dropout=0.0, sample_rate=44100):
        super().__init__()
        latent_dim = latent_dim or encoder_dim * 2 ** len(encoder_rates)
        self.hop_length = int(np.prod(encoder_rates))
        self.sample_rate = sample_rate
        self.encoder = Encoder(encoder_dim, encoder_rates, latent_dim)
        self.quantizer = ResidualVectorQuantize(latent_dim, n_codebooks, codebook_size,
                                                codebook_dim, float(quantizer_dropout))
        self.decoder = Decoder(latent_dim, decoder_dim, decoder_rates)

    def forward(self, audio):
        """audio [B, 1, T] -> dict: audio [B, 1, <= T], z, codes, vq losses."""
        length = audio.shape[-1]
        audio = F.pad(audio, (0, -length % self.hop_length))
        z, codes, latents, commitment, codebook = self.quantizer(self.encoder(audio))
        return {"audio": self.decoder(z)[..., :length], "z": z, "codes": codes,
                "latents": latents, "vq/commitment_loss": commitment,
                "vq/codebook_loss": codebook}


# ----------------------------------------------------------------------------- discriminator

def _act(conv):
    return nn.Sequential(conv, nn.LeakyReLU(LEAKY_SLOPE))


def _width(channels, mult, max_channels):
    return max(1, min(int(channels * mult), max_channels))


class MPD(nn.Module):
    """HiFi-GAN's period discriminator: the waveform folded to [frames, period]."""

    def __init__(self, period, channels=32, max_channels=1024):
        super().__init__()
        self.period = period
        widths = [_width(channels, m, max_channels) for m in (1, 4, 16, 32, 32)]
        ins = [1] + widths[:-1]
        self.convs = nn.ModuleList([
            _act(WNConv(2, c_in, c_out, (5, 1), (3, 1) if i < 4 else 1, (2, 0)))
            for i, (c_in, c_out) in enumerate(zip(ins, widths))])
        self.conv_post = WNConv(2, widths[-1], 1, (3, 1), padding=(1, 0))

    def forward(self, x):
        x = F.pad(x, (0, self.period - x.shape[-1] % self.period), mode="reflect")
        x = x.unflatten(-1, (-1, self.period))
        fmap = []
        for layer in self.convs:
            x = layer(x)
            fmap.append(x)
        fmap.append(self.conv_post(x))
        return fmap


class MSD(nn.Module):
    """MelGAN's wave discriminator with DAC's layers, on audio average-pooled by `rate`."""

    def __init__(self, rate=1, channels=32, max_channels=1024):
        super().__init__()
        self.rate = rate
        widths = [_width(channels, m, max_channels) for m in (0.5, 2, 8, 32, 32, 32)]
        specs = [(15, 1, 7, False)] + [(41, 4, 20, True)] * 4 + [(5, 1, 2, False)]
        convs, c_in = [], 1
        for c_out, (k, s, p, grouped) in zip(widths, specs):
            groups = math.gcd(math.gcd(max(1, c_in // 4), c_in), c_out) if grouped else 1
            convs.append(_act(WNConv(1, c_in, c_out, k, s, p, groups=groups)))
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.conv_post = WNConv(1, c_in, 1, 3, 1, 1)

    def forward(self, x):
        if self.rate > 1:
            x = F.avg_pool1d(x, self.rate)
        fmap = []
        for layer in self.convs:
            x = layer(x)
            fmap.append(x)
        fmap.append(self.conv_post(x))
        return fmap


class MRD(nn.Module):
    """DAC's multi-band complex-STFT discriminator for one window length."""

    def __init__(self, window_length, channels=32, bands=BANDS, hop_factor=0.25):
        super().__init__()
        self.window_length, self.hop = window_length, int(window_length * hop_factor)
        n_bins = window_length // 2 + 1
        self.bands = [(int(lo * n_bins), int(hi * n_bins)) for lo, hi in bands]
        ch = channels
        stack = lambda: nn.ModuleList(
            [_act(WNConv(2, 2, ch, (3, 9), 1, (1, 4)))]
            + [_act(WNConv(2, ch, ch, (3, 9), (1, 2), (1, 4))) for _ in range(3)]
            + [_act(WNConv(2, ch, ch, (3, 3), 1, (1, 1)))])
        self.band_convs = nn.ModuleList([stack() for _ in self.bands])
        self.conv_post = WNConv(2, ch, 1, (3, 3), 1, (1, 1))
        self.register_buffer("window", torch.hann_window(window_length), persistent=False)

    def spectrogram(self, x):
        """audiotools' `stft(match_stride=True)`: x [B, 1, T] -> [B, 2, ceil(T / hop), bins]."""
        x = x[:, 0].float()
        time_ = x.shape[-1]
        right = -(-time_ // self.hop) * self.hop - time_
        pad = (self.window_length - self.hop) // 2
        x = F.pad(x[:, None], (pad, pad + right), mode="reflect")[:, 0]
        spec = torch.stft(x, self.window_length, self.hop, window=self.window, center=True,
                          return_complex=True)[..., 2:-2]
        return torch.view_as_real(spec).permute(0, 3, 2, 1)

    def forward(self, x):
        spec = self.spectrogram(x)
        fmap, outs = [], []
        for (lo, hi), stack in zip(self.bands, self.band_convs):
            band = spec[..., lo:hi]
            for layer in stack:
                band = layer(band)
                fmap.append(band)
            outs.append(band)
        fmap.append(self.conv_post(torch.cat(outs, dim=-1)))
        return fmap


class Discriminator(nn.Module):
    """DAC's combined discriminator: MPDs, then MSDs, then MRDs (keys as in DAC)."""

    def __init__(self, periods=(2, 3, 5, 7, 11), fft_sizes=(2048, 1024, 512), rates=(),
                 channels=32, max_channels=1024, bands=BANDS):
        super().__init__()
        discs = [MPD(p, channels, max_channels) for p in periods]
        discs += [MSD(r, channels, max_channels) for r in rates]
        discs += [MRD(n, channels, bands) for n in fft_sizes]
        self.discriminators = nn.ModuleList(discs)

    def forward(self, x):
        """x [B, 1, T] -> per sub-discriminator, its feature maps then its logits."""
        x = x - x.mean(dim=-1, keepdim=True)
        x = 0.8 * x / (x.abs().max(dim=-1, keepdim=True)[0] + 1e-9)
        return [d(x) for d in self.discriminators]


def build_models(cfg) -> tuple[Generator, Discriminator]:
    """Generator and discriminator of a codec experiment config (`model`, `discriminator`).

    Raises:
      ValueError: for a model DAC's classes do not describe (multi-channel, causal, another
        quantizer).
    """
    m, d = cfg.model, cfg.discriminator
    if int(m.channels) != 1 or m.get("causal", False) or m.quantizer != "dac_rvq" or \
            m.get("transpose_output_padding", False):
        raise ValueError("the DAC peer takes mono, non-causal dac_rvq codecs without output "
                         "padding; pick a DAC preset such as codec:dac_44khz")
    gen = Generator(m.encoder_dim, tuple(m.encoder_rates), m.latent_dim, m.decoder_dim,
                    tuple(m.decoder_rates), m.n_codebooks, m.codebook_size, m.codebook_dim,
                    m.quantizer_dropout, m.sample_rate)
    disc = Discriminator(tuple(d.periods), tuple(d.fft_sizes), tuple(d.rates), d.channels,
                         d.max_channels)
    return gen, disc


# ----------------------------------------------------------------------------- losses and step

class MelLoss(nn.Module):
    """DAC's training `MelSpectrogramLoss`: sum over scales of L1(log10(clamp(mel, 1e-5)))."""

    def __init__(self, sample_rate):
        super().__init__()
        from ldm_jax.audio.dsp import mel_filterbank

        for w, n in zip(MEL_WINDOW_LENGTHS, MEL_N_MELS):
            basis = mel_filterbank(sample_rate, w, n_mels=n, htk=False, norm="slaney")
            self.register_buffer(f"mel_{w}", torch.from_numpy(np.array(basis)), persistent=False)
            self.register_buffer(f"window_{w}", torch.hann_window(w), persistent=False)

    def forward(self, y, x):
        both = torch.cat([y, x]).flatten(0, 1).float()
        loss = 0
        for w in MEL_WINDOW_LENGTHS:
            mag = torch.stft(both, w, w // 4, window=getattr(self, f"window_{w}"), center=True,
                             pad_mode="reflect", return_complex=True).abs()
            mel = mag.transpose(1, 2) @ getattr(self, f"mel_{w}")
            mel_y, mel_x = mel.clamp(min=1e-5).log10().chunk(2)
            loss = loss + (mel_y - mel_x).abs().mean()
        return loss


def si_sdr_loss(y, x, clip_min=-30.0, eps=1e-8):
    """Negative scale-invariant SDR in dB, clamped below at `clip_min`, batch mean."""
    y, x = y.flatten(1).float(), x.flatten(1).float()
    y, x = y - y.mean(1, keepdim=True), x - x.mean(1, keepdim=True)
    target = ((y * x).sum(1, keepdim=True) + eps) / (x.square().sum(1, keepdim=True) + eps) * x
    sdr = 10 * torch.log10(target.square().sum(1) / (y - target).square().sum(1) + eps)
    return torch.clamp(-sdr, min=clip_min).mean()


def make_train_step(gen: Generator, disc: Discriminator, cfg, dtype="float32", *,
                    compile: bool = False):
    """DAC's GAN step: discriminator update, then generator update (AdamW, exponential decay).

    Args:
      gen, disc: the peer modules, on their device (parameters float32).
      cfg: the codec experiment config (`train` optimiser settings, `loss_weights`).
      dtype: "float32", or "bfloat16" for autocast.
      compile: wrap both modules in `torch.compile`.

    Returns:
      `step(audio [B, 1, T]) -> {"loss", "disc/loss"}` (tensors, not synchronised).
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = next(gen.parameters()).device
    t, weights = cfg.train, {k: float(v) for k, v in cfg.loss_weights.items() if float(v)}
    opt_g = torch.optim.AdamW(gen.parameters(), lr=t.lr, betas=(t.b1, t.b2), eps=t.eps,
                              weight_decay=t.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=t.disc_lr, betas=(t.b1, t.b2), eps=t.eps,
                              weight_decay=t.weight_decay)
    sched = [torch.optim.lr_scheduler.ExponentialLR(o, t.lr_decay) for o in (opt_g, opt_d)]
    mel = MelLoss(gen.sample_rate).to(device)
    run_g, run_d = (torch.compile(gen), torch.compile(disc)) if compile else (gen, disc)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(audio):
        gen.train()
        with autocast():
            out = run_g(audio)
        y = out["audio"].float()
        x = audio[..., :y.shape[-1]]
        with autocast():
            d_fake, d_real = run_d(y.detach()), run_d(x)
        d_loss = sum(f[-1].float().square().mean() + (1 - r[-1].float()).square().mean()
                     for f, r in zip(d_fake, d_real))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        nn.utils.clip_grad_norm_(disc.parameters(), t.disc_grad_clip)
        opt_d.step()

        named = {"vq/commitment_loss": out["vq/commitment_loss"],
                 "vq/codebook_loss": out["vq/codebook_loss"]}
        if "mel/loss" in weights:
            named["mel/loss"] = mel(y, x)
        if "waveform/l1" in weights:
            named["waveform/l1"] = (y - x).abs().mean()
        if "waveform/si_sdr_loss" in weights:
            named["waveform/si_sdr_loss"] = si_sdr_loss(y, x)
        with autocast():
            d_fake = run_d(y)
            with torch.no_grad():
                d_real = run_d(x)
        named["adv/gen_loss"] = sum((1 - f[-1].float()).square().mean() for f in d_fake)
        named["adv/feat_loss"] = sum(F.l1_loss(a.float(), b.float()) for f, r in
                                     zip(d_fake, d_real) for a, b in zip(f[:-1], r[:-1]))
        loss = sum(w * named[k] for k, w in weights.items() if k in named)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(gen.parameters(), t.grad_clip)
        opt_g.step()
        for s in sched:
            s.step()
        return {"loss": loss.detach(), "disc/loss": d_loss.detach()}

    return step


def benchmark(cfg, batch: int, samples: int | None = None, repeats: int = 5,
              device: str = "cpu", dtype: str = "float32", compile: bool = False) -> dict:
    """Times the peer G+D step on random audio.

    Args:
      cfg: a codec experiment config (e.g. `codec:dac_44khz`).
      batch: clips per step B.
      samples: clip length (default: the training crop of `cfg`, as `ldm_jax.codec.train`).
      repeats: timed steps after the first.
      device: a torch device string.
      dtype: "float32" or "bfloat16" (autocast).
      compile: use `torch.compile`.

    Returns:
      {"params", "disc_params", "samples", "step_s" (median), "compile_s" (first step),
       "examples_per_s", "torch", "device", "dtype", "compile"}.
    """
    from ldm_jax.codec.train import crop_samples

    device = torch.device(device)
    gen, disc = build_models(cfg)
    gen, disc = gen.to(device), disc.to(device)
    samples = samples or crop_samples(cfg)
    g = torch.Generator(device="cpu").manual_seed(0)
    audio = (0.1 * torch.randn(batch, 1, samples, generator=g)).to(device)
    step = make_train_step(gen, disc, cfg, dtype, compile=compile)
    first, median = time_step(step, audio, device, repeats)
    count = lambda mod: sum(p.numel() for p in mod.parameters())
    return {"params": count(gen), "disc_params": count(disc), "samples": samples,
            "step_s": median, "compile_s": first, "examples_per_s": batch / median,
            "torch": torch.__version__, "device": str(device), "dtype": str(dtype),
            "compile": bool(compile)}
