"""Instrument voices of the procedural music generator: band-limited synthesis in numpy.

Every pitched voice is alias-free at any sample rate: partials above `NYQUIST_FRACTION` of the rate
are never generated.

- Plucked string: Karplus-Strong (Karplus & Strong, "Digital synthesis of plucked-string and drum
  timbres", 1983) with Jaffe & Smith's decay-shortening loop filter and exact fractional tuning
  ("Extensions of the Karplus-Strong plucked-string algorithm", 1983). The loop is linear and
  time-invariant, so it is evaluated as its transfer function on an FFT grid (exponentially
  weighted to suppress time aliasing) instead of sample by sample.
- Organ: additive drawbars at the Hammond footages, read from a single-cycle wavetable.
- Bell: two-operator FM (Chowning, "The synthesis of complex audio spectra by means of frequency
  modulation", 1973) with a decaying index, capped so significant sidebands stay below Nyquist.
- Synth lead: detuned saw/square wavetables through a resonant low-pass whose cutoff follows an
  envelope (the filter is applied per harmonic, one table per cutoff, interpolated in time).
- Bass: sub sine plus low-passed saw with a short filter decay.
- Drum kit: pitch-swept sine kick, tone plus band-passed noise snare, high-passed noise hi-hats.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.fft
from scipy import signal

TABLE_BITS = 14
TABLE_SIZE = 1 << TABLE_BITS
NYQUIST_FRACTION = 0.45
_TWO_PI = np.float32(2.0 * np.pi)

# Hammond drawbars as harmonics of the 16' sub-octave: 16', 5 1/3', 8', 4', 2 2/3', 2', 1 3/5',
# 1 1/3', 1'.
DRAWBAR_HARMONICS = np.array([1, 3, 2, 4, 6, 8, 10, 12, 16])
DRAWBAR_PRESETS = ("848000000", "808800000", "006808000", "838600030", "808808008", "008530000")
DRUM_NAMES = ("kick", "snare", "hat", "open_hat")
LEAD_CUTOFFS = np.geomspace(1.0, 40.0, 8)  # filter cutoffs of the lead's tables, in harmonics
LEAD_RESONANCES = (1.0, 1.8, 3.0)


def midi_to_hz(midi):
    """MIDI note number(s) to frequency in Hz (A4 = 69 = 440 Hz)."""
    return 440.0 * 2.0 ** ((np.asarray(midi, np.float64) - 69.0) / 12.0)


def harmonic_tables(amplitudes: np.ndarray) -> np.ndarray:
    """Single-cycle wavetables from sine amplitudes of harmonics 1..K.

    Args:
      amplitudes: [..., K] amplitude of each harmonic.

    Returns:
      float32 [..., TABLE_SIZE] one period of the waveform.
    """
    amps = np.asarray(amplitudes, np.float64)
    k = min(amps.shape[-1], TABLE_SIZE // 2 - 1)
    spec = np.zeros(amps.shape[:-1] + (TABLE_SIZE // 2 + 1,), np.complex128)
    spec[..., 1:k + 1] = -0.5j * TABLE_SIZE * amps[..., :k]
    return scipy.fft.irfft(spec, n=TABLE_SIZE, axis=-1).astype(np.float32)


def phase_accumulate(freq: np.ndarray, sample_rate: int) -> np.ndarray:
    """Fixed-point phase (uint32 wraps once per cycle) of an oscillator at freq [n] Hz."""
    # Below Nyquist the increment fits in a signed 32-bit integer, the fast conversion path.
    inc = (np.asarray(freq, np.float32) * np.float32(2.0**32 / sample_rate)).astype(np.int32)
    inc = inc.view(np.uint32)
    return np.cumsum(inc, dtype=np.uint32) - inc[0]


def read_table(tables: np.ndarray, phase: np.ndarray, position: np.ndarray | None = None):
    """Reads wavetables at fixed-point phases, crossfading between adjacent tables.

    Args:
      tables: float32 [C, TABLE_SIZE] (or [TABLE_SIZE] when position is None).
      phase: uint32 [n] from `phase_accumulate`.
      position: float [n] in [0, C - 1]: which table to read, fractional for a crossfade.

    Returns:
      float32 [n].
    """
    index = (phase >> np.uint32(32 - TABLE_BITS)).astype(np.int64)
    if position is None:
        return tables.take(index)
    position = np.clip(position, 0.0, tables.shape[0] - 1.001).astype(np.float32)
    lower = position.astype(np.int64)
    weight = position - lower
    flat = tables.reshape(-1)
    a = flat.take(lower * TABLE_SIZE + index)
    b = flat.take((lower + 1) * TABLE_SIZE + index)
    return a + weight * (b - a)


def envelope(n: int, sample_rate: int, gate: float, attack: float, decay: float, sustain: float,
             release: float) -> np.ndarray:
    """ADSR with exponential decay and release; float32 [n]."""
    t = np.arange(n, dtype=np.float32) / np.float32(sample_rate)
    env = np.empty(n, np.float32)
    held = min(n, max(1, int(gate * sample_rate)))
    rise = min(held, max(1, int(attack * sample_rate)))
    env[:rise] = t[:rise] / np.float32(attack)
    if sustain < 1.0:
        env[rise:held] = sustain + (1.0 - sustain) * np.exp((t[rise:held] - attack) / -decay)
    else:
        env[rise:held] = 1.0
    env[held:] = env[held - 1] * np.exp((t[held:] - t[held - 1]) / np.float32(-release))
    return env


def max_harmonic(freq: float, sample_rate: int) -> int:
    """How many harmonics of freq lie below NYQUIST_FRACTION of the sample rate (at least 1)."""
    return max(1, int(NYQUIST_FRACTION * sample_rate / freq))


def voice_params(instrument: str, rng: np.random.Generator) -> dict:
    """Per-clip timbre settings, shared by every note of the clip so one clip is one instrument."""
    if instrument == "plucked_string":
        return {"brightness": rng.uniform(0.35, 0.9), "pick": rng.uniform(0.08, 0.3),
                "t60": rng.uniform(0.8, 1.6)}
    if instrument == "organ":
        return {"drawbars": DRAWBAR_PRESETS[rng.integers(len(DRAWBAR_PRESETS))],
                "tremolo_hz": rng.uniform(5.5, 7.0), "tremolo_depth": rng.uniform(0.05, 0.2)}
    if instrument == "bell":
        return {"ratio": (1.4, 2.76)[rng.integers(2)], "index": rng.uniform(2.0, 5.0),
                "index_decay": rng.uniform(0.08, 0.3), "decay": rng.uniform(0.6, 1.4)}
    if instrument == "synth_lead":
        return {"square": bool(rng.integers(2)), "detune_cents": rng.uniform(6.0, 18.0),
                "cutoff_peak": rng.uniform(14.0, 32.0), "cutoff_sustain": rng.uniform(2.0, 5.0),
                "filter_decay": rng.uniform(0.08, 0.35),
                "resonance": LEAD_RESONANCES[rng.integers(len(LEAD_RESONANCES))],
                "vibrato": rng.uniform(0.002, 0.006)}
    if instrument == "bass":
        return {"sub": rng.uniform(0.5, 1.2), "cutoff_hz": rng.uniform(250.0, 600.0),
                "pluck_hz": rng.uniform(900.0, 2000.0), "filter_decay": rng.uniform(0.05, 0.2)}
    if instrument == "drum_kit":
        return {"kick_hz": rng.uniform(45.0, 60.0), "kick_sweep": rng.uniform(100.0, 200.0),
                "kick_decay": rng.uniform(0.12, 0.3), "snare_hz": rng.uniform(160.0, 230.0),
                "snare_decay": rng.uniform(0.08, 0.18), "hat_decay": rng.uniform(0.02, 0.05)}
    raise ValueError(f"unknown instrument {instrument!r}")


def _time(n, sample_rate):
    return np.arange(n, dtype=np.float32) / np.float32(sample_rate)


@functools.lru_cache(maxsize=64)
def _organ_table(drawbars: str, num_harmonics: int) -> np.ndarray:
    levels = np.array([int(c) for c in drawbars], np.float64)
    gains = np.where(levels > 0, 10.0 ** ((levels - 8.0) * 3.0 / 20.0), 0.0)
    keep = DRAWBAR_HARMONICS <= num_harmonics
    amps = np.zeros(16)
    amps[DRAWBAR_HARMONICS[keep] - 1] = gains[keep]
    return harmonic_tables(amps / max(amps.sum(), 1e-6))


def _organ(freq, gate, velocity, n, sample_rate, params, rng, memo):
    base = freq / 2.0  # the 16' drawbar sounds an octave below the played key
    table = _organ_table(params["drawbars"], min(16, max_harmonic(base * 1.01, sample_rate)))
    t = _time(n, sample_rate)
    # Scanner vibrato: a slow frequency wobble shared by all drawbars.
    f = base * (1.0 + 0.0015 * np.sin(_TWO_PI * np.float32(6.8) * t))
    y = read_table(table, phase_accumulate(f, sample_rate))
    tremolo = 1.0 - params["tremolo_depth"] * (
        0.5 + 0.5 * np.sin(_TWO_PI * np.float32(params["tremolo_hz"]) * t))
    y *= tremolo * envelope(n, sample_rate, gate, 0.006, 1.0, 1.0, 0.03)
    click = min(n, int(0.003 * sample_rate))
    y[:click] += 0.03 * rng.standard_normal(click).astype(np.float32)
    return velocity * y


def bell_decay(freq, params):
    """Amplitude time constant of a bell note in seconds: lower bells ring longer."""
    return params["decay"] * (440.0 / freq) ** 0.3


def _bell(freq, gate, velocity, n, sample_rate, params, rng, memo):
    ratio = params["ratio"]
    # Sideband n has amplitude J_n(index), negligible (< -35 dB) beyond n = index + 3 (Carson's
    # rule keeps n <= index + 1); keep those sidebands below Nyquist so nothing folds over.
    index_cap = (0.5 * sample_rate - freq) / (ratio * freq) - 3.0
    index0 = float(np.clip(min(params["index"] * velocity, index_cap), 0.0, None))
    decay = bell_decay(freq, params)
    t = _time(n, sample_rate)
    index = index0 * np.exp(t / np.float32(-params["index_decay"]))
    modulator = np.sin(_TWO_PI * np.float32(ratio * freq) * t)
    y = np.sin(_TWO_PI * np.float32(freq) * t + index * modulator)
    # A struck bell rings on; a held note is damped only after it has sounded for a while.
    amp = envelope(n, sample_rate, gate + decay, 0.002, decay, 0.0, 0.4 * decay)
    return velocity * y * amp


def _resonant_lowpass(harmonic: np.ndarray, cutoff: np.ndarray, q: float) -> np.ndarray:
    r = harmonic / cutoff
    return 1.0 / np.sqrt((1.0 - r * r) ** 2 + (r / q) ** 2)


def harmonic_ladder(freq: float, sample_rate: int) -> int:
    """How many harmonics fit below Nyquist, rounded down to a half-octave ladder (for caching)."""
    limit = max_harmonic(freq, sample_rate)
    return int(2.0 ** (np.floor(2.0 * np.log2(limit)) / 2.0))


@functools.lru_cache(maxsize=48)
def _lead_tables(square: bool, num_harmonics: int, resonance: float) -> np.ndarray:
    k = np.arange(1, num_harmonics + 1, dtype=np.float64)
    amps = 1.0 / k
    if square:
        amps = np.where(k % 2 == 1, amps, 0.0)
    response = _resonant_lowpass(k, LEAD_CUTOFFS[:, None], resonance)
    return harmonic_tables(amps * response / (1.0 + resonance))


def _synth_lead(freq, gate, velocity, n, sample_rate, params, rng, memo):
    t = _time(n, sample_rate)
    detune = 2.0 ** (params["detune_cents"] / 1200.0)
    tables = _lead_tables(params["square"], harmonic_ladder(freq * detune * 1.01, sample_rate),
                          params["resonance"])
    sustain, peak = params["cutoff_sustain"], params["cutoff_peak"]
    cutoff = sustain + (peak - sustain) * velocity * np.exp(t / np.float32(-params["filter_decay"]))
    position = np.log(cutoff) * np.float32((len(LEAD_CUTOFFS) - 1) / np.log(LEAD_CUTOFFS[-1]))
    # Delayed vibrato, as a player would add it on a held note.
    depth = params["vibrato"] * np.clip((t - 0.15) / 0.2, 0.0, 1.0)
    wobble = 1.0 + depth * np.sin(_TWO_PI * np.float32(5.5) * t)
    y = read_table(tables, phase_accumulate(freq * detune * wobble, sample_rate), position)
    y += read_table(tables, phase_accumulate(freq / detune * wobble, sample_rate), position)
    return velocity * 0.5 * y * envelope(n, sample_rate, gate, 0.008, 0.3, 0.8, 0.06)


def _bass(freq, gate, velocity, n, sample_rate, params, rng, memo):
    if ("bass", freq) not in memo:
        k = np.arange(1, max_harmonic(freq * 1.01, sample_rate) + 1, dtype=np.float64)
        cutoffs = np.array([[params["cutoff_hz"]], [params["pluck_hz"]]]) / freq
        amps = _resonant_lowpass(k, cutoffs, 0.9) / k
        amps[:, 0] += params["sub"]
        memo["bass", freq] = harmonic_tables(amps / (1.0 + params["sub"]))
    t = _time(n, sample_rate)
    position = velocity * np.exp(t / np.float32(-params["filter_decay"]))
    inc = np.uint32(int(freq * 2.0**32 / sample_rate))
    phase = np.arange(n, dtype=np.uint32) * inc  # wraps once per cycle
    y = read_table(memo["bass", freq], phase, position)
    return velocity * y * envelope(n, sample_rate, gate, 0.004, 0.25, 0.65, 0.04)


def _string_loops(freqs, sample_rate, params):
    """Loop gain, loop-filter coefficient s and fractional delay of each string."""
    omega0 = 2.0 * np.pi * freqs / sample_rate
    # Loop gain per period for the requested decay; the decay-shortening loop filter
    # L(z) = (1 - s) + s z^-1 takes as much of it as it can (s = 1/2 is the original KS).
    t60 = params["t60"] * (196.0 / freqs) ** 0.35
    rho = 10.0 ** (-3.0 / (freqs * t60))
    q = np.minimum((1.0 - rho * rho) / (2.0 * (1.0 - np.cos(omega0))), 0.25)
    s = 0.5 * (1.0 - np.sqrt(1.0 - 4.0 * q))
    loop = (1.0 - s) + s * np.exp(-1j * omega0)
    gain = np.minimum(rho / np.abs(loop), 0.99999)
    # Exact tuning: the delay line's fractional length makes the loop phase 2 pi at f0.
    return gain, s, (2.0 * np.pi + np.angle(loop)) / omega0


@functools.lru_cache(maxsize=8)
def _weighted_grid(size):
    """alpha, the weights alpha^n [size] and alpha e^{-i omega} on the rfft grid of size."""
    alpha = 10.0 ** (-4.0 / size)
    weights = (alpha ** np.arange(size)).astype(np.float32)
    z1 = alpha * np.exp(-2j * np.pi * np.arange(size // 2 + 1) / size)
    return alpha, weights, z1.astype(np.complex64)


def karplus_strong(excitations: np.ndarray, gain, s, delay, length: int) -> np.ndarray:
    """Output of the Karplus-Strong loop y[n] = x[n] + gain ((1 - s) y[n - D] + s y[n - D - 1]).

    D may be fractional (an ideal fractional delay). The loop is evaluated as its transfer
    function on one FFT grid; weighting by alpha^n moves the poles inwards so the circular wrap of
    the infinite response is attenuated by alpha^size (-80 dB), and undoing the weighting on the
    first half, the only part kept, amplifies rounding by at most 40 dB.

    Args:
      excitations: [R, P] input bursts.
      gain, s, delay: [R] loop gain (< 1), loop-filter coefficient in [0, 1], delay in samples.
      length: output samples per row.

    Returns:
      float32 [R, length].
    """
    gain, s, delay = (np.atleast_1d(np.asarray(v, np.float64)) for v in (gain, s, delay))
    size = 1 << int(np.ceil(np.log2(2 * max(length, excitations.shape[1]))))
    alpha, weights, z1 = _weighted_grid(size)
    # Rows with the same string share one transfer function (chords restruck on every beat).
    loops, which = np.unique(np.stack([gain, s, delay], axis=1), axis=0, return_inverse=True)
    gain, s, delay = loops.T
    # (alpha^-1 e^{i omega_k})^-D for all bins k as powers of its k = 1 value (float64 keeps the
    # accumulated rounding of the running product near 1e-12).
    zd = np.empty((len(loops), size // 2 + 1), np.complex128)
    zd[:, 0] = alpha**delay * gain
    zd[:, 1:] = np.exp(-2j * np.pi * delay / size)[:, None]
    zd = np.cumprod(zd, axis=1).astype(np.complex64)
    s = s[:, None].astype(np.float32)
    transfer = np.float32(1.0) / (np.float32(1.0) - zd * ((np.float32(1.0) - s) + s * z1))
    padded = np.zeros((excitations.shape[0], size), np.float32)
    padded[:, :excitations.shape[1]] = excitations
    spectrum = scipy.fft.rfft(padded * weights) * transfer[which.ravel()]
    return scipy.fft.irfft(spectrum, n=size)[:, :length] / weights[:length]


def _pluck_batch(freqs, gates, velocities, lengths, sample_rate, params, rng):
    """Karplus-Strong notes, one FFT per class of note lengths."""
    freqs = np.asarray(freqs, np.float64)
    gain, s, delay = _string_loops(freqs, sample_rate, params)
    periods = np.round(sample_rate / freqs).astype(int) + 1
    bursts = np.zeros((len(freqs), periods.max()), np.float32)
    for row, (period, velocity) in enumerate(zip(periods, velocities)):
        burst = rng.uniform(-1.0, 1.0, period)
        burst -= burst.mean()
        pick = max(1, int(params["pick"] * period))
        burst[pick:] -= burst[:-pick]
        # Softer plucks are darker: a one-pole low-pass on the excitation.
        pole = 1.0 - params["brightness"] * (0.4 + 0.6 * velocity)
        bursts[row, :period] = signal.lfilter([1.0 - pole], [1.0, -pole], burst)
    classes = np.ceil(np.log2(np.maximum(lengths, periods.max()))).astype(int)
    out = [None] * len(freqs)
    for size_class in np.unique(classes):
        rows = np.flatnonzero(classes == size_class)
        y = karplus_strong(bursts[rows], gain[rows], s[rows], delay[rows], int(lengths[rows].max()))
        for row, i in zip(y, rows):
            note = row[:lengths[i]]
            # Releasing the string: the finger damps it within a few tens of milliseconds.
            start = min(lengths[i], int(gates[i] * sample_rate))
            note[start:] *= np.exp(_time(lengths[i] - start, sample_rate) / np.float32(-0.025))
            out[i] = np.float32(0.5 * velocities[i]) * note
    return out


_VOICES = {"organ": _organ, "bell": _bell, "synth_lead": _synth_lead, "bass": _bass}
# Seconds a note sounds after its gate closes (five time constants of its release).
_TAILS = {"plucked_string": 0.12, "organ": 0.15, "synth_lead": 0.3, "bass": 0.2}


def render_notes(instrument: str, onsets, gates, pitches, velocities, sample_rate: int,
                 num_samples: int, params: dict, rng: np.random.Generator) -> np.ndarray:
    """Renders a list of notes of one pitched instrument.

    Args:
      instrument: one of plucked_string, organ, bell, synth_lead, bass.
      onsets, gates: [n] note start times and held durations in seconds.
      pitches: [n] MIDI note numbers.
      velocities: [n] in (0, 1].
      sample_rate: output rate in Hz.
      num_samples: output length; notes are cut at the end.
      params: from `voice_params(instrument, rng)`.
      rng: randomness of the excitations.

    Returns:
      float32 [num_samples], unnormalised.
    """
    out = np.zeros(num_samples, np.float32)
    freqs = midi_to_hz(pitches)
    starts = np.round(np.asarray(onsets) * sample_rate).astype(int)
    keep = starts < num_samples
    starts, freqs = starts[keep], freqs[keep]
    gates, velocities = np.asarray(gates)[keep], np.asarray(velocities)[keep]
    if instrument == "bell":
        tails = 3.0 * bell_decay(freqs, params)
    else:
        tails = np.full(len(freqs), _TAILS[instrument])
    lengths = np.minimum(((gates + tails) * sample_rate).astype(int), num_samples - starts)
    if instrument == "plucked_string":
        notes = _pluck_batch(freqs, gates, velocities, lengths, sample_rate, params, rng)
    else:
        voice, memo = _VOICES[instrument], {}
        notes = [voice(f, g, v, n, sample_rate, params, rng, memo)
                 for f, g, v, n in zip(freqs, gates, velocities, lengths)]
    for start, note in zip(starts, notes):
        out[start:start + len(note)] += note
    return out


@functools.lru_cache(maxsize=16)
def _drum_filters(sample_rate: int):
    nyquist = sample_rate / 2.0
    snare = signal.butter(2, [1000.0 / nyquist, min(6000.0, 0.8 * nyquist) / nyquist],
                          btype="bandpass", output="sos")
    hat = signal.butter(2, min(7000.0, 0.6 * nyquist) / nyquist, btype="highpass", output="sos")
    return snare, hat


def drum_samples(sample_rate: int, params: dict, rng: np.random.Generator) -> dict:
    """One hit of each drum, float32 [n] each, peak about 1."""
    snare_sos, hat_sos = _drum_filters(sample_rate)
    sr = np.float32(sample_rate)

    def seconds(duration):
        return np.arange(int(duration * sample_rate), dtype=np.float32) / sr

    t = seconds(0.5)
    sweep_tau = np.float32(0.03)
    f_end, f_sweep = params["kick_hz"], params["kick_sweep"]
    # Closed-form phase of an exponential pitch drop from f_end + f_sweep to f_end.
    phase = f_end * t + f_sweep * sweep_tau * (1.0 - np.exp(-t / sweep_tau))
    kick = np.sin(_TWO_PI * phase) * np.exp(-t / np.float32(params["kick_decay"]))
    click = int(0.004 * sample_rate)
    kick[:click] += 0.3 * rng.uniform(-1, 1, click).astype(np.float32)

    t = seconds(0.35)
    body = (np.sin(_TWO_PI * np.float32(params["snare_hz"]) * t)
            + 0.5 * np.sin(_TWO_PI * np.float32(params["snare_hz"] * 1.8) * t))
    rattle = signal.sosfilt(snare_sos, rng.standard_normal(len(t))).astype(np.float32)
    snare = (0.5 * body * np.exp(-t / np.float32(0.05))
             + 1.5 * rattle * np.exp(-t / np.float32(params["snare_decay"])))

    noise = signal.sosfilt(hat_sos, rng.standard_normal(int(0.4 * sample_rate)))
    noise = noise.astype(np.float32)
    t = seconds(0.4)
    hat = noise[:int(0.12 * sample_rate)] * np.exp(
        -t[:int(0.12 * sample_rate)] / np.float32(params["hat_decay"]))
    open_hat = noise * np.exp(-t / np.float32(0.12))
    hits = {"kick": kick, "snare": snare, "hat": hat, "open_hat": open_hat}
    return {k: (v / np.abs(v).max()).astype(np.float32) for k, v in hits.items()}


def render_drums(times, names, velocities, sample_rate: int, num_samples: int, params: dict,
                 rng: np.random.Generator) -> np.ndarray:
    """Places drum hits (seconds, one of DRUM_NAMES, velocity) on a float32 [num_samples] track."""
    samples = drum_samples(sample_rate, params, rng)
    out = np.zeros(num_samples, np.float32)
    for onset, name, velocity in zip(times, names, velocities):
        start = int(round(onset * sample_rate))
        hit = samples[name]
        end = min(num_samples, start + len(hit))
        if end > start:
            out[start:end] += np.float32(velocity) * hit[:end - start]
    return out
