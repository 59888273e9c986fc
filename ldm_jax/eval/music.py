"""Musical analysis of audio, independent of any model: key and mode, tempo, loudness class.

Used to check whether generated clips follow the attributes their prompts asked for:

- key and mode by the Krumhansl-Schmuckler algorithm (Krumhansl 1990, "Cognitive Foundations of
  Musical Pitch"): the clip's mean chroma vector (librosa's `chroma_stft`) is correlated with the
  Krumhansl-Kessler major and minor key profiles rotated to each of the 12 tonics; the best of
  the 24 correlations names the key;
- tempo from the autocorrelation of librosa's onset-strength envelope (`librosa.feature.tempo`,
  Ellis 2007's beat-tracking prior centred on 120 BPM), compared within a relative tolerance,
  optionally forgiving octave errors (half or double tempo);
- loudness as ITU-R BS.1770-4 integrated loudness (`ldm_jax.audio.dsp.loudness_lufs`), classed
  with thresholds halfway between the loudness ranges the synthetic generator draws from.
"""

from __future__ import annotations

import warnings

import numpy as np

from ldm_jax.data import synthetic

KEYS = synthetic.KEYS
MODES = synthetic.MODES
# Krumhansl & Kessler (1982) probe-tone ratings, tonic first.
MAJOR_PROFILE = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR_PROFILE = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
TEMPO_TOLERANCE = 0.08
CHROMA_N_FFT = 4096  # 3.9 Hz bins at 16 kHz: semitones stay apart down to the bass register


def _loudness_thresholds() -> tuple[tuple[float, str], ...]:
    """(upper bound in LUFS, class) pairs, each bound halfway between two generator ranges."""
    ranges = sorted(synthetic.LOUDNESS_RANGES.items(), key=lambda kv: kv[1][0])
    bounds = [((lo_hi[1] + nxt[1][0]) / 2, name)
              for (name, lo_hi), nxt in zip(ranges[:-1], ranges[1:])]
    return tuple(bounds) + ((float("inf"), ranges[-1][0]),)


LOUDNESS_THRESHOLDS = _loudness_thresholds()


def _mono(audio) -> np.ndarray:
    x = np.asarray(audio, np.float32)
    return x.mean(-1) if x.ndim == 2 else x.reshape(-1)


def chroma(audio, sample_rate: int) -> np.ndarray:
    """Mean chroma vector of a clip, float [12] (C first)."""
    import librosa

    x = _mono(audio)
    n_fft = min(CHROMA_N_FFT, max(256, 2 ** int(np.floor(np.log2(max(len(x), 2))))))
    with warnings.catch_warnings():
        # Unpitched clips (drums, silence) leave librosa no peaks to estimate the tuning from.
        warnings.simplefilter("ignore", UserWarning)
        c = librosa.feature.chroma_stft(y=x, sr=int(sample_rate), n_fft=n_fft,
                                        hop_length=n_fft // 4)
    return c.mean(axis=1)


def key_scores(chroma_vector: np.ndarray) -> np.ndarray:
    """Correlations with the 24 rotated key profiles: float [2, 12] (major, minor) x tonic."""
    c = np.asarray(chroma_vector, np.float64)
    c = c - c.mean()
    scores = np.zeros((2, 12))
    for m, profile in enumerate((MAJOR_PROFILE, MINOR_PROFILE)):
        for tonic in range(12):
            p = np.roll(profile, tonic)
            p = p - p.mean()
            denom = np.linalg.norm(c) * np.linalg.norm(p)
            scores[m, tonic] = float(c @ p / denom) if denom > 0 else 0.0
    return scores


def estimate_key(audio, sample_rate: int) -> tuple[str, str, float]:
    """Key of a clip by Krumhansl-Schmuckler.

    Args:
      audio: [T] or [T, C] float audio.
      sample_rate: its rate in Hz.

    Returns:
      (tonic in `synthetic.KEYS` spelling, "major" or "minor", correlation in [-1, 1]).
    """
    scores = key_scores(chroma(audio, sample_rate))
    mode, tonic = np.unravel_index(int(np.argmax(scores)), scores.shape)
    return KEYS[tonic], MODES[mode], float(scores[mode, tonic])


def estimate_tempo(audio, sample_rate: int) -> float:
    """Global tempo in BPM from the onset-strength autocorrelation (librosa)."""
    import librosa

    x = _mono(audio)
    onset = librosa.onset.onset_strength(y=x, sr=int(sample_rate))
    return float(librosa.feature.tempo(onset_envelope=onset, sr=int(sample_rate))[0])


def measure_loudness(audio, sample_rate: int) -> float:
    """Integrated loudness in LUFS (BS.1770-4); -inf for silence."""
    from ldm_jax.audio.dsp import loudness_lufs

    return float(loudness_lufs(_mono(audio), int(sample_rate)))


def loudness_class(lufs: float) -> str:
    """"quiet", "moderate" or "loud" for a loudness in LUFS (silence is quiet)."""
    for bound, name in LOUDNESS_THRESHOLDS:
        if lufs < bound:
            return name
    return LOUDNESS_THRESHOLDS[-1][1]


def tempo_matches(estimate: float, reference: float, tolerance: float = TEMPO_TOLERANCE,
                  octave: bool = False) -> bool:
    """Whether a tempo estimate is within `tolerance` (relative) of the reference, or, with
    `octave`, of half or double the reference."""
    if not (np.isfinite(estimate) and reference > 0):
        return False
    targets = (reference, 2 * reference, reference / 2) if octave else (reference,)
    return any(abs(estimate - t) <= tolerance * t for t in targets)


def analyse(audio, sample_rate: int) -> dict:
    """Every attribute of one clip.

    Returns:
      {"key", "mode", "key_score", "tempo_bpm", "loudness_db", "loudness"}.
    """
    key, mode, score = estimate_key(audio, sample_rate)
    lufs = measure_loudness(audio, sample_rate)
    return {"key": key, "mode": mode, "key_score": score,
            "tempo_bpm": estimate_tempo(audio, sample_rate), "loudness_db": lufs,
            "loudness": loudness_class(lufs)}


def adherence(analyses: list[dict], references: list[dict]) -> dict:
    """Accuracies of analysed attributes against reference attributes.

    Key and mode are scored on references with a key (pitched clips); tempo on references with
    a positive `tempo_bpm`; loudness on references with a `loudness` class.

    Args:
      analyses: `analyse` outputs, one per clip.
      references: the attributes each clip should have (dataset fields).

    Returns:
      {"key_accuracy", "mode_accuracy", "key_mode_accuracy", "tempo_accuracy",
       "tempo_octave_accuracy", "loudness_accuracy"} (NaN where no reference has the field), and
      the counts "n_key", "n_tempo", "n_loudness"; where analyses carry the attribute judge's
      pick (`judge_instrument`), also "judge_instrument_accuracy" and "n_judged".
    """
    pairs = list(zip(analyses, references))
    keyed = [(a, r) for a, r in pairs if r.get("key")]
    timed = [(a, r) for a, r in pairs if float(r.get("tempo_bpm") or 0) > 0]
    loud = [(a, r) for a, r in pairs if r.get("loudness")]
    judged = [(a, r) for a, r in pairs if r.get("instrument") and "judge_instrument" in a]
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")
    # The attribute judge's instrument (`ldm_jax.judge`), where the clips were judged.
    extra = {"judge_instrument_accuracy": mean([a["judge_instrument"] == r["instrument"]
                                                for a, r in judged]),
             "n_judged": len(judged)} if judged else {}
    return {**extra,
        "key_accuracy": mean([a["key"] == r["key"] for a, r in keyed]),
        "mode_accuracy": mean([a["mode"] == r["mode"] for a, r in keyed]),
        "key_mode_accuracy": mean([a["key"] == r["key"] and a["mode"] == r["mode"]
                                   for a, r in keyed]),
        "tempo_accuracy": mean([tempo_matches(a["tempo_bpm"], float(r["tempo_bpm"]))
                                for a, r in timed]),
        "tempo_octave_accuracy": mean([tempo_matches(a["tempo_bpm"], float(r["tempo_bpm"]),
                                                     octave=True) for a, r in timed]),
        "loudness_accuracy": mean([a["loudness"] == r["loudness"] for a, r in loud]),
        "n_key": len(keyed), "n_tempo": len(timed), "n_loudness": len(loud),
    }


def shuffled(analyses: list[dict], references: list[dict], rounds: int = 1000,
             seed: int = 0) -> tuple[dict, dict]:
    """Adherence of the same clips to other prompts' references: a permutation test.

    `chance` assumes guesses independent of any bias; a generator that leans towards one class
    (or the analyser that does) scores above it without reading the prompt. Scoring the clips
    against randomly permuted references keeps every bias and removes only the pairing.

    Args:
      analyses, references: as `adherence`.
      rounds: random permutations.
      seed: their seed.

    Returns:
      `(means, p_values)`, each keyed like `adherence`'s accuracies: the mean accuracy over the
      permutations, and the one-sided permutation p-value of the true pairing,
      `(1 + #{permuted >= true}) / (1 + rounds)`.
    """
    true = adherence(analyses, references)
    keys = [k for k in true if not k.startswith("n_")]
    rng = np.random.default_rng(seed)
    runs = [adherence(analyses, [references[i] for i in rng.permutation(len(references))])
            for _ in range(int(rounds))]
    means, p_values = {}, {}
    for k in keys:
        values = np.asarray([r[k] for r in runs], np.float64)
        values = values[np.isfinite(values)]
        if np.isnan(true[k]) or not values.size:
            means[k] = p_values[k] = float("nan")
            continue
        means[k] = float(values.mean())
        p_values[k] = float((1 + np.sum(values >= true[k] - 1e-12)) / (1 + values.size))
    return means, p_values


def chance(references: list[dict]) -> dict:
    """Accuracy of a guess drawn from the references' own attribute distribution.

    For a categorical attribute that is the sum of squared class frequencies; for tempo, the
    share of ordered pairs of references whose tempi match within the tolerance (with octave
    errors for the octave metric). Uniform guessing would give 1/12 (key), 1/2 (mode), 1/24
    (key and mode) and 1/3 (loudness).

    Returns:
      The keys of `adherence` (accuracies only).
    """
    def categorical(values):
        if not values:
            return float("nan")
        _, counts = np.unique(np.asarray(values, dtype=object).astype(str), return_counts=True)
        p = counts / counts.sum()
        return float(np.sum(p * p))

    keyed = [r for r in references if r.get("key")]
    tempi = [float(r["tempo_bpm"]) for r in references if float(r.get("tempo_bpm") or 0) > 0]

    def tempo_pairs(octave):
        if not tempi:
            return float("nan")
        return float(np.mean([tempo_matches(a, b, octave=octave) for a in tempi for b in tempi]))

    return {"key_accuracy": categorical([r["key"] for r in keyed]),
            "mode_accuracy": categorical([r["mode"] for r in keyed]),
            "key_mode_accuracy": categorical([f"{r['key']} {r['mode']}" for r in keyed]),
            "tempo_accuracy": tempo_pairs(False), "tempo_octave_accuracy": tempo_pairs(True),
            "loudness_accuracy": categorical([r["loudness"] for r in references
                                              if r.get("loudness")])}
