"""MusicLDM's beat-synchronous latent mixup: partners, downbeat alignment, the mixing weight."""

import numpy as np
import pytest
import scipy.stats

from ldm_jax.diffusion import mixup
from ldm_jax.diffusion.schedules import DiffusionError

RATE, LENGTH, FRAMES, DIM = 50.0, 100, 300, 4


def test_tempo_and_partners():
    assert mixup.tempo_of(np.arange(8) * 0.5) == pytest.approx(120.0)
    assert np.isnan(mixup.tempo_of(np.array([1.0])))
    partners = mixup.tempo_partners([120, 123, 140, 118, float("nan")], 0.05)
    assert [list(p) for p in partners] == [[1, 3], [0, 3], [], [0, 1], []]


def clip(downbeats, seed):
    """Latents that mark each downbeat's frame in channel 0 (the rest noise)."""
    z = np.random.default_rng(seed).normal(size=(FRAMES, DIM)).astype(np.float32) * 0.01
    z[np.round(np.asarray(downbeats) * RATE).astype(int), 0] = 1.0
    return z


def make(n=12, seed=0):
    rng = np.random.default_rng(seed)
    downbeats = [np.arange(rng.uniform(0.1, 1.9), FRAMES / RATE - 0.05, 2.0) for _ in range(n)]
    source = [{"latents": clip(d, i)} for i, d in enumerate(downbeats)]
    rhythm = {"tempo": [120.0 + rng.uniform(-2, 2) for _ in range(n)], "downbeats": downbeats}
    return source, rhythm


def test_paired_downbeats_coincide_within_a_frame():
    source, rhythm = make()
    mixer = mixup.Mixer(source, rhythm, lambda z: z, RATE, probability=1.0, tolerance=0.05,
                        beta=5.0, seed=0)
    checked = 0
    for draw in range(20):
        rows = np.arange(len(source))
        starts = np.random.default_rng(draw).integers(0, FRAMES - LENGTH, len(rows))
        z = np.stack([source[i]["latents"][s:s + LENGTH] for i, s in zip(rows, starts)])
        mixed, mask, which, info = mixer(z, np.ones(z.shape[:2], bool), rows, starts)
        assert which.any() and mask.all()
        for r in np.flatnonzero(which):
            own = rhythm["downbeats"][r] * RATE - starts[r]
            own = own[own >= 0][0]
            j, offset = info["partner"][r], info["offset"][r]
            landed = rhythm["downbeats"][j] * RATE - offset
            assert np.min(np.abs(landed - own)) <= 1.0  # within one latent frame
            # Where the shifted partner has frames, the mix is lam z1 + (1 - lam) z2; elsewhere
            # the example is kept.
            lam = info["lam"][r]
            frames = offset + np.arange(LENGTH)
            inside = (frames >= 0) & (frames < FRAMES)
            assert inside.mean() >= 0.5
            want = z[r].copy()
            want[inside] = lam * z[r][inside] + (1 - lam) * source[j]["latents"][frames[inside]]
            np.testing.assert_allclose(mixed[r], want, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked > 100


def test_whole_clip_windows_mix_with_shifted_partners():
    source, rhythm = make(n=12, seed=4)
    mixer = mixup.Mixer(source, rhythm, lambda z: z, RATE, probability=1.0, tolerance=0.05,
                        beta=5.0, seed=0)
    rows = np.arange(len(source))
    z = np.stack([s["latents"] for s in source])  # the crop is the whole clip
    _, _, which, info = mixer(z, np.ones(z.shape[:2], bool), rows, np.zeros(len(rows), int))
    assert which.mean() > 0.8 and np.abs(info["offset"][which]).max() > 0


def test_mixing_weight_is_beta_five_five_and_draws_are_reproducible():
    source, rhythm = make(n=40, seed=1)
    mixer = mixup.Mixer(source, rhythm, lambda z: z, RATE, probability=1.0, tolerance=0.05,
                        beta=5.0, seed=3)
    lams = []
    for draw in range(60):
        rows = np.arange(len(source))
        starts = np.random.default_rng(draw).integers(0, FRAMES - LENGTH, len(rows))
        z = np.stack([source[i]["latents"][s:s + LENGTH] for i, s in zip(rows, starts)])
        out, _, which, info = mixer(z, np.ones(z.shape[:2], bool), rows, starts)
        lams += list(info["lam"][which])
        if draw == 0:  # the same batch mixes the same way (a resumed run repeats it)
            again = mixer(z, np.ones(z.shape[:2], bool), rows, starts)[0]
            np.testing.assert_array_equal(out, again)
    lams = np.asarray(lams)
    assert len(lams) > 1000
    assert abs(lams.mean() - 0.5) < 0.01
    assert abs(lams.std() - scipy.stats.beta(5, 5).std()) < 0.01  # 0.151
    assert scipy.stats.kstest(lams, scipy.stats.beta(5, 5).cdf).pvalue > 0.01


def test_nothing_mixes_without_a_partner_or_at_probability_zero():
    source, rhythm = make(n=4)
    lonely = {"tempo": [60.0, 90.0, 120.0, 180.0], "downbeats": rhythm["downbeats"]}
    rows, starts = np.arange(4), np.zeros(4, int)
    z = np.stack([s["latents"][:LENGTH] for s in source])
    for r, p in ((lonely, 1.0), (rhythm, 0.0)):
        mixer = mixup.Mixer(source, r, lambda x: x, RATE, probability=p, tolerance=0.05,
                            beta=5.0, seed=0)
        out, _, which, _ = mixer(z, np.ones(z.shape[:2], bool), rows, starts)
        assert not which.any()
        np.testing.assert_array_equal(out, z)
    with pytest.raises(DiffusionError, match="train.mixup"):
        mixup.Mixer(source, rhythm, lambda x: x, RATE, probability=1.5, tolerance=0.05,
                    beta=5.0, seed=0)


def test_mixup_needs_audio_conditioning():
    from ldm_jax.diffusion.config import TrainConfig
    with pytest.raises(DiffusionError, match="condition_on_audio=True"):
        TrainConfig(mixup=0.5)
    assert TrainConfig(mixup=0.5, condition_on_audio=True).mixup_beta == 5.0
