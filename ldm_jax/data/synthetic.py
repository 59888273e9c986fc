"""Procedural music with captions: the embedded dataset of the text-to-audio chain.

Each example is a short clip of one instrument (`instruments.py`) playing a melody, a chord
progression, an arpeggio or, for the drum kit, a groove, in a key and mode, at a tempo and a
loudness, together with a natural-language caption of those attributes. The music is written so
the attributes survive signal analysis: progressions are diatonic cadences that start on the tonic
(I-IV-V-I, i-iv-V-i, ...), melodies put chord tones on the beats, every onset sits on the tempo's
beat grid, and pitched clips may carry a light drum groove (`with_drums`) that makes the tempo
easy to track. Loudness is set to a target and measured with the ITU-R BS.1770-4 integrated
loudness (K-weighting, 400 ms blocks, absolute and relative gates).

Determinism: an example is a function of (seed, split, index, sample_rate, seconds) only, drawn
from `np.random.default_rng(np.random.SeedSequence([seed, crc32(split), index]))`.
"""

from __future__ import annotations

import functools
import re
import zlib

import numpy as np
from scipy import ndimage, signal

from ldm_jax.audio import loudness
from ldm_jax.data import instruments

INSTRUMENTS = ("plucked_string", "organ", "bell", "synth_lead", "bass", "drum_kit")
KEYS = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MODES = ("major", "minor")
PATTERNS = ("melody", "chords", "arpeggio", "groove")
LOUDNESS = ("quiet", "moderate", "loud")
TEMPI = ("slow", "moderate", "fast")

# Attribute draws keep a gap between classes so the words stay true under analysis.
TEMPO_RANGES = {"slow": (70, 88), "moderate": (94, 116), "fast": (124, 160)}
LOUDNESS_RANGES = {"quiet": (-36.0, -31.0), "moderate": (-25.0, -21.0), "loud": (-15.0, -12.0)}
PEAK = 0.99

# Chord symbols: (root above the tonic in semitones, third in semitones).
CHORDS = {"I": (0, 4), "ii": (2, 3), "iii": (4, 3), "IV": (5, 4), "V": (7, 4), "vi": (9, 3),
          "i": (0, 3), "iv": (5, 3), "v": (7, 3), "VI": (8, 4), "VII": (10, 4)}
PROGRESSIONS = {"major": ("I IV V I", "I vi IV V", "I V vi IV", "I IV I V", "I V IV I"),
                "minor": ("i iv V i", "i VI iv V", "i iv v i", "i VII VI V", "i iv i V")}
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
# Lowest and highest MIDI note of each instrument's melodies; chords sit in the lower half.
REGISTERS = {"plucked_string": (52, 79), "organ": (55, 81), "bell": (62, 86),
             "synth_lead": (57, 84), "bass": (31, 55)}
# 16-step bars: kick, snare, closed hat, open hat.
GROOVES = {
    "rock": ("x.......x.x.....", "....x.......x...", "x.x.x.x.x.x.x.x.", "................"),
    "four_on_the_floor": ("x...x...x...x...", "....x.......x...", "x.x.x.x.x.x.x.x.",
                          "..x...x...x...x."),
    "backbeat": ("x.....x.x.......", "....x.......x...", "xxxxxxxxxxxxxxxx", "................"),
    "half_time": ("x.........x.....", "........x.......", "x.x.x.x.x.x.x.x.", "................"),
    "light": ("x...x...x...x...", "....x.......x...", "x.x.x.x.x.x.x.x.", "................"),
}


def tempo_class(bpm: float) -> str:
    """The tempo word a listener would use for bpm: slow, moderate or fast."""
    return "slow" if bpm < 91 else ("moderate" if bpm < 120 else "fast")


def sample_attributes(rng: np.random.Generator) -> dict:
    """Draws instrument, key, mode, tempo, pattern, drums and loudness class of one clip."""
    instrument = INSTRUMENTS[rng.integers(len(INSTRUMENTS))]
    if instrument == "drum_kit":
        pattern, key, mode, with_drums = "groove", "", "", True
    else:
        choices = ("melody", "arpeggio") if instrument == "bass" else PATTERNS[:3]
        pattern = choices[rng.integers(len(choices))]
        key, mode = KEYS[rng.integers(12)], MODES[rng.integers(2)]
        with_drums = bool(rng.random() < 0.5)
    low, high = TEMPO_RANGES[TEMPI[rng.integers(3)]]
    return {"instrument": instrument, "key": key, "mode": mode,
            "tempo_bpm": float(rng.integers(low, high + 1)), "pattern": pattern,
            "with_drums": with_drums, "loudness": LOUDNESS[rng.integers(3)]}


def _progression(rng, mode, total_beats):
    """[(start_beat, beats, (root, third, fifth) above the tonic)] covering the clip."""
    chord_beats = 1 if total_beats < 6 else (2 if total_beats < 12 else 4)
    symbols = PROGRESSIONS[mode][rng.integers(len(PROGRESSIONS[mode]))].split()
    chords = []
    for i in range(int(np.ceil(total_beats / chord_beats))):
        root, third = CHORDS[symbols[i % len(symbols)]]
        chords.append((i * chord_beats, chord_beats, (root, root + third, root + 7)))
    return chords


def _chord_at(chords, beat):
    return chords[min(int(beat // chords[0][1]), len(chords) - 1)][2]


def _pitches_in(pcs, tonic, low, high):
    """All MIDI notes in [low, high] whose pitch class (relative to the tonic) is in pcs."""
    notes = np.arange(low, high + 1)
    return notes[np.isin((notes - tonic) % 12, np.asarray(pcs) % 12)]


def _melody(rng, tonic, mode, chords, total_beats, low, high):
    cells = ((2, 2), (1, 1, 2), (2, 1, 1), (1, 1, 1, 1), (3, 1), (4,))  # eighths per 2 beats
    scale = np.asarray(SCALES[mode])
    # How strongly each pitch class (above the tonic) is preferred on the beat: the tonal
    # hierarchy (tonic triad, then the subdominant that tells the key from its dominant's), so
    # that a few seconds of a single line still state the key.
    emphasis = np.ones(12)
    emphasis[[0, 4 if mode == "major" else 3, 7, 5]] = (5.0, 3.0, 2.5, 2.0)
    first = low + (tonic - low) % 12
    first += 12 if first + 16 <= high else 0
    notes, eighth, previous = [], 0, None
    while eighth < 2 * total_beats:
        for length in cells[rng.integers(len(cells))]:
            chord = _chord_at(chords, eighth / 2)
            if previous is None:
                pitch = first
            elif eighth % 2 == 0:
                # On the beat: a chord tone near the last note.
                pool = _pitches_in(chord, tonic, low, high)
                weight = np.exp(-np.abs(pool - previous) / 4.0) * emphasis[(pool - tonic) % 12]
                pitch = int(rng.choice(pool, p=weight / weight.sum()))
            elif rng.random() < 0.15:
                pitch = None  # a breath between phrases
            else:
                # Off the beat: a step along the scale (the leading tone over a minor-key V).
                step_scale = scale.copy()
                if mode == "minor" and chord[1] == 11:
                    step_scale[6] = 11
                pool = _pitches_in(step_scale, tonic, low, high)
                pool = pool[(np.abs(pool - previous) > 0) & (np.abs(pool - previous) <= 2)]
                pitch = int(rng.choice(pool)) if len(pool) else previous
            if pitch is not None:
                notes.append((eighth / 2, length / 2, pitch, 1.0 if eighth % 2 == 0 else 0.8))
                previous = pitch
            eighth += length
    return notes


def _voicing(chord, tonic, center):
    """The root an octave below, then a close triad around center (the order of a downstroke)."""
    tones = sorted(center - 6 + (tonic + pc - center + 6) % 12 for pc in chord)
    bass = tones[0] - 1 - (tones[0] - 1 - tonic - chord[0]) % 12  # highest root below the triad
    return [bass - 12 if tones[0] - bass < 5 else bass] + tones


def _chords(rng, tonic, chords, low, strum):
    style = ("sustained", "beats", "charleston")[rng.integers(3)]
    notes, center = [], low + 10
    for start, beats, chord in chords:
        if style == "beats" or (style == "charleston" and beats < 2):
            hits = [(start + b, 1.0) for b in range(beats)]
        elif style == "charleston":
            hits = [(start + b + offset, length) for b in range(0, beats, 2)
                    for offset, length in ((0.0, 1.5), (1.5, 0.5))]
        else:
            hits = [(start, beats)]
        for onset, duration in hits:
            for i, pitch in enumerate(_voicing(chord, tonic, center)):
                notes.append((onset + strum * i, duration, pitch, 0.9 if onset % 1 else 1.0))
    return notes


def _arpeggio(rng, tonic, chords, low, bpm):
    shapes = ((0, 1, 2, 3), (3, 2, 1, 0), (0, 1, 2, 3, 2, 1), (0, 2, 1, 2), (0, 1, 2, 1))
    shape = shapes[rng.integers(len(shapes))]
    step = 0.25 if bpm <= 100 and rng.random() < 0.5 else 0.5
    notes = []
    for start, beats, chord in chords:
        root = low + (tonic + chord[0] - low) % 12
        tones = [root, root + chord[1] - chord[0], root + 7, root + 12]
        for i in range(int(round(beats / step))):
            accent = 1.0 if (i * step) % 1 == 0 else 0.8
            notes.append((start + i * step, step, tones[shape[i % len(shape)]], accent))
    return notes


def _groove(rng, name, bpm, seconds, level, bar_accent=False):
    kick, snare, hat, open_hat = GROOVES[name]
    step = 15.0 / bpm
    times, names, velocities = [], [], []
    for i in range(int(np.ceil(seconds / step))):
        for pattern, drum, gain in ((kick, "kick", 1.0), (snare, "snare", 0.8),
                                    (hat, "hat", 0.45), (open_hat, "open_hat", 0.4)):
            if pattern[i % 16] == "x":
                accent = 1.0 if i % 4 == 0 else 0.8
                if bar_accent and i % 16:
                    accent *= 0.8  # the bar's first step stands out
                times.append(i * step)
                names.append(drum)
                velocities.append(level * gain * accent * rng.uniform(0.9, 1.0))
    return times, names, velocities


# Caption vocabulary: several ways to say each attribute value.
INSTRUMENT_WORDS = {
    "plucked_string": ("plucked string", "plucked guitar", "picked string", "plucked nylon string"),
    "organ": ("organ", "drawbar organ", "electric organ", "Hammond-style organ"),
    "bell": ("bell", "FM bell", "chiming bell", "glassy bell"),
    "synth_lead": ("synth lead", "lead synth", "synthesizer lead", "analog synth lead"),
    "bass": ("bass", "synth bass", "bass synth", "deep bass"),
    "drum_kit": ("drum", "drum kit", "drum machine", "electronic drum"),
}
DRUM_NOUNS = ("drums", "a drum kit", "a drum machine", "electronic drums")
PATTERN_WORDS = {
    "melody": ("melody", "melodic line", "tune", "melodic phrase"),
    "chords": ("chord progression", "chord sequence", "progression of chords", "series of chords"),
    "arpeggio": ("arpeggio", "arpeggiated pattern", "broken-chord pattern", "arpeggiated figure"),
    "groove": ("groove", "beat", "pattern", "rhythm"),
    "bass_melody": ("line", "riff", "bassline", "melody"),
}
TEMPO_WORDS = {"slow": ("slow", "laid-back", "relaxed", "leisurely", "unhurried"),
               "moderate": ("mid-tempo", "moderate-tempo", "steady", "medium-paced"),
               "fast": ("fast", "upbeat", "lively", "energetic", "brisk", "quick")}
TEMPO_PHRASES = {"slow": ("at a slow tempo", "at a relaxed pace", "at a leisurely pace"),
                 "moderate": ("at a moderate tempo", "at a medium pace", "at a steady pace"),
                 "fast": ("at a fast tempo", "at a brisk pace", "at an upbeat tempo")}
LOUDNESS_WORDS = {"quiet": ("quiet", "soft", "hushed", "delicate"),
                  "moderate": ("medium-volume", "moderate-volume", "mid-volume"),
                  "loud": ("loud", "powerful", "forceful", "punchy")}
LOUDNESS_PHRASES = {"quiet": ("played softly", "at a low volume", "played quietly", "softly"),
                    "moderate": ("at a moderate volume", "at medium volume",
                                 "at a comfortable volume", "at a moderate level"),
                    "loud": ("played loudly", "at a high volume", "loudly", "at full volume")}
DRUM_PHRASES = ("with drums", "over a light drum beat", "backed by soft drums",
                "with a simple drum groove", "accompanied by a drum machine")
SOLO_PHRASES = ("", "", "", "solo", "unaccompanied", "on its own")
KEY_SPELLINGS = {"C#": "C sharp", "Eb": "E flat", "F#": "F sharp", "Ab": "A flat", "Bb": "B flat"}
PITCHED_TEMPLATES = (
    "{a} {tempo} {inst} {pattern} {key}{drums}, {dyn_phrase}.",
    "{tempo} {inst} {pattern} {key} {bpm}{drums}, {dyn_phrase}.",
    "{dyn} {inst} {pattern} {key}{drums}, {tempo_phrase}.",
    "{a} {inst} playing {a} {dyn}, {tempo} {pattern} {key} {bpm}{drums}.",
    "{key}: {a} {dyn}, {tempo} {inst} {pattern}{drums}, {bpm_bare}.",
    "{a} {dyn}, {tempo} {pattern} on {a} {inst} {key}{drums}.",
    "{tempo} {pattern} {key} for {inst}{drums}, {dyn_phrase}, {bpm_bare}.",
)
DRUM_TEMPLATES = (
    "{a} {tempo} {inst} {pattern} {bpm}, {dyn_phrase}.",
    "{dyn} {inst} {pattern}, {tempo_phrase}, {bpm_bare}.",
    "{drum_noun} playing {a} {dyn}, {tempo} {pattern} {bpm}.",
    "{tempo} {inst} {pattern}, {dyn_phrase}, {bpm_bare}.",
)


def _pick(rng, words):
    return words[rng.integers(len(words))]


def _articles(text):
    """Replaces each article marker by "a" or "an" to agree with the sound of the next word."""
    def article(match):
        word = match.group(1)
        vowel = word[0].lower() in "aeiou" or word.startswith("FM")
        return ("an " if vowel else "a ") + word
    return re.sub(r"\x00 (\S+)", article, text)


def caption_for(attributes: dict, rng: np.random.Generator) -> str:
    """An English description of the attributes, worded by rng (deterministic given its state).

    Args:
      attributes: instrument, key, mode, tempo_bpm, pattern, loudness, with_drums (optional).
      rng: chooses template and synonyms.

    Returns:
      One sentence naming instrument, key and mode (pitched), tempo, pattern and dynamics, e.g.
      "Upbeat plucked string melody in D major at 128 BPM, played softly."
    """
    instrument, bpm = attributes["instrument"], int(round(attributes["tempo_bpm"]))
    drums = instrument == "drum_kit"
    pattern = attributes["pattern"]
    if instrument == "bass" and pattern == "melody":
        pattern = "bass_melody"
    key = attributes.get("key", "")
    if key in KEY_SPELLINGS and rng.random() < 0.5:
        key = KEY_SPELLINGS[key]
    key_phrase = _pick(rng, ("in {} {}", "in the key of {} {}", "in {} {}")).format(
        key, attributes.get("mode", ""))
    accompaniment = ""
    if not drums:
        words = DRUM_PHRASES if attributes.get("with_drums") else SOLO_PHRASES
        accompaniment = _pick(rng, words)
        accompaniment = f" {accompaniment}" if accompaniment else ""
    inst = _pick(rng, INSTRUMENT_WORDS[instrument])
    template = _pick(rng, DRUM_TEMPLATES if drums else PITCHED_TEMPLATES)
    fields = {"a": "\x00", "tempo": _pick(rng, TEMPO_WORDS[tempo_class(bpm)]), "inst": inst,
              "pattern": _pick(rng, PATTERN_WORDS[pattern]),
              "key": key_phrase, "bpm": _pick(rng, ("at {} BPM", "at {} bpm", "({} BPM)")),
              "bpm_bare": _pick(rng, ("{} BPM", "{} bpm", "{} beats per minute")),
              "dyn": _pick(rng, LOUDNESS_WORDS[attributes["loudness"]]),
              "dyn_phrase": _pick(rng, LOUDNESS_PHRASES[attributes["loudness"]]),
              "tempo_phrase": _pick(rng, TEMPO_PHRASES[tempo_class(bpm)]),
              "drum_noun": _pick(rng, DRUM_NOUNS),
              "drums": accompaniment}
    fields["bpm"], fields["bpm_bare"] = fields["bpm"].format(bpm), fields["bpm_bare"].format(bpm)
    text = _articles(template.format(**fields))
    return text[0].upper() + text[1:]


@functools.lru_cache(maxsize=16)
def k_weighting(sample_rate: int) -> np.ndarray:
    """BS.1770 K-weighting (high shelf, then RLB high-pass) as second-order sections for
    `scipy.signal.sosfilt`: the coefficients of `ldm_jax.audio.loudness.k_weighting`."""
    return np.array([np.concatenate([b, a]) for b, a in loudness.k_weighting(sample_rate)])


def block_powers(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mean square of the K-weighted signal in 400 ms blocks with 75% overlap; [blocks]."""
    weighted = signal.sosfilt(k_weighting(sample_rate), np.asarray(audio, np.float64))
    block, hop = int(round(0.4 * sample_rate)), int(round(0.1 * sample_rate))
    if len(weighted) < block:  # shorter than one block: the whole clip is the block
        return np.array([np.mean(weighted**2)])
    energy = np.concatenate([[0.0], np.cumsum(weighted**2)])
    starts = np.arange(0, len(weighted) - block + 1, hop)
    return (energy[starts + block] - energy[starts]) / block


def gated_loudness(powers: np.ndarray) -> float:
    """BS.1770-4 integrated loudness (LUFS) from `block_powers`; -70 for silence."""
    loudness = -0.691 + 10.0 * np.log10(np.maximum(powers, 1e-20))
    kept = powers[loudness > -70.0]
    if not len(kept):
        return -70.0
    relative = -0.691 + 10.0 * np.log10(kept.mean()) - 10.0
    kept = kept[-0.691 + 10.0 * np.log10(kept) > relative]
    return float(-0.691 + 10.0 * np.log10(kept.mean()))


def loudness_lufs(audio: np.ndarray, sample_rate: int) -> float:
    """Integrated loudness of a mono float signal [time] in LUFS (BS.1770-4)."""
    return gated_loudness(block_powers(audio, sample_rate))


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-12))


DYNAMICS = ("crescendo", "decrescendo", "swell", "accents")
BEATS_PER_BAR = 4  # every pattern is in 4/4: 16-step grooves, chords change on the bar


def dynamics_curve(rng: np.random.Generator, shape: str, seconds: float, beat: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A level curve in dB over the clip as breakpoints (times, dB), linear in between.

    crescendo and decrescendo span 12-20 dB; a swell rises that much to a peak in the middle
    third and falls back; accents hold a level 8-12 dB below two to four beats played at full
    level (50 ms ramps), as sforzandi.
    """
    span = rng.uniform(12.0, 20.0)
    if shape == "crescendo":
        return np.array([0.0, seconds]), np.array([-span, 0.0])
    if shape == "decrescendo":
        return np.array([0.0, seconds]), np.array([0.0, -span])
    if shape == "swell":
        peak = rng.uniform(seconds / 3, 2 * seconds / 3)
        return np.array([0.0, peak, seconds]), np.array([-span, 0.0, -span])
    if shape != "accents":
        raise ValueError(f"unknown dynamics shape {shape!r}; use one of {', '.join(DYNAMICS)}")
    floor, ramp = -rng.uniform(8.0, 12.0), 0.05
    beats = np.arange(1, int(seconds / beat) - 1, 2)  # two beats apart: accents never touch
    chosen = np.sort(rng.choice(beats, size=min(len(beats), int(rng.integers(2, 5))),
                                replace=False)) * beat
    times, levels = [0.0], [floor]
    for t in chosen:
        times += [t - ramp, t, t + beat - ramp, t + beat]
        levels += [floor, 0.0, 0.0, floor]
    times.append(seconds)
    levels.append(floor)
    return np.array(times), np.array(levels)


def render(attributes: dict, rng: np.random.Generator, sample_rate: int = 16000,
           seconds: float = 4.0, controls: bool = False) -> tuple[np.ndarray, float] | tuple:
    """Plays the attributes of `sample_attributes` as audio.

    Args:
      attributes: instrument, key, mode, tempo_bpm, pattern, with_drums, loudness (and with
        `controls`, dynamics: one of DYNAMICS).
      rng: source of every musical and timbral choice.
      sample_rate: output rate in Hz.
      seconds: clip length.
      controls: also vary the level within the clip (`dynamics_curve`), accent the first beat
        of each bar, and return the ground truth of the controls.

    Returns:
      (audio float32 [round(seconds * sample_rate)] with peak <= 0.99, measured loudness in LUFS),
      and with `controls` a third item: {"beats", "downbeats": seconds; "note_onsets",
      "note_offsets": seconds, "note_pitches": MIDI numbers of the pitched notes;
      "gain_times", "gain_db": the level curve's breakpoints}.
    """
    num_samples = int(round(seconds * sample_rate))
    instrument, bpm = attributes["instrument"], float(attributes["tempo_bpm"])
    beat = 60.0 / bpm
    params = instruments.voice_params(instrument, rng)
    notes_out = (np.zeros(0), np.zeros(0), np.zeros(0, np.int32))
    if instrument == "drum_kit":
        names = tuple(g for g in GROOVES if g != "light")
        times, hits, velocities = _groove(rng, names[rng.integers(len(names))], bpm, seconds, 1.0,
                                          bar_accent=controls)
        mix = instruments.render_drums(times, hits, velocities, sample_rate, num_samples, params,
                                       rng)
    else:
        tonic, mode = KEYS.index(attributes["key"]), attributes["mode"]
        low, high = REGISTERS[instrument]
        total_beats = seconds / beat
        chords = _progression(rng, mode, total_beats)
        if attributes["pattern"] == "melody":
            notes = _melody(rng, tonic, mode, chords, total_beats, low, high)
        elif attributes["pattern"] == "chords":
            strum = 0.02 / beat if instrument == "plucked_string" else 0.0
            notes = _chords(rng, tonic, chords, low, strum)
        else:
            notes = _arpeggio(rng, tonic, chords, low + (0 if instrument == "bass" else 5), bpm)
        onsets, durations, pitches, accents = (np.array(v, np.float64) for v in zip(*notes))
        if controls:  # the first beat of each bar played louder than the others
            accents = accents * np.where(onsets % BEATS_PER_BAR == 0, 1.0, 0.8)
        legato = rng.uniform(0.75, 0.95)
        velocities = np.clip(accents * rng.uniform(0.85, 1.0, len(accents)), 0.05, 1.0)
        mix = instruments.render_notes(instrument, onsets * beat, durations * beat * legato,
                                       pitches, velocities, sample_rate, num_samples, params, rng)
        inside = onsets * beat < seconds
        notes_out = (onsets[inside] * beat,
                     np.minimum((onsets + durations * legato)[inside] * beat, seconds),
                     pitches[inside].astype(np.int32))
        if attributes["with_drums"]:
            times, hits, drum_vel = _groove(rng, "light", bpm, seconds, 1.0,
                                            bar_accent=controls)
            kit = instruments.voice_params("drum_kit", rng)
            drums = instruments.render_drums(times, hits, drum_vel, sample_rate, num_samples,
                                             kit, rng)
            # The instrument stays in front: drums about 10 dB below it.
            level = 10.0 ** (-rng.uniform(8.0, 12.0) / 20.0) * _rms(mix) / _rms(drums)
            mix = mix + np.float32(level) * drums
    if controls:
        gain_times, gain_db = dynamics_curve(rng, attributes["dynamics"], seconds, beat)
        t = np.arange(num_samples) / sample_rate
        mix = mix * (10.0 ** (np.interp(t, gain_times, gain_db) / 20.0)).astype(np.float32)
    fade = min(int(0.01 * sample_rate), num_samples)
    mix[num_samples - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    target = rng.uniform(*LOUDNESS_RANGES[attributes["loudness"]])
    audio, lufs = normalize_loudness(mix, sample_rate, target)
    if not controls:
        return audio, lufs
    beats = np.arange(int(np.ceil(seconds / beat))) * beat
    beats = beats[beats < seconds]
    truth = {"beats": beats, "downbeats": beats[::BEATS_PER_BAR], "note_onsets": notes_out[0],
             "note_offsets": notes_out[1], "note_pitches": notes_out[2],
             "gain_times": gain_times, "gain_db": gain_db}
    return audio, lufs, truth


def limit(audio: np.ndarray, sample_rate: int, ceiling: float = PEAK) -> np.ndarray:
    """Look-ahead peak limiter: a smooth gain that keeps |audio| <= ceiling.

    The gain is the moving average (5 ms ramps) of the running minimum, over the same window, of
    the gain each sample needs, so it never exceeds what any sample within the ramp needs: no
    overshoot, no clipping, and transients are turned down before they arrive.
    """
    ramp = max(1, int(0.005 * sample_rate))
    needed = np.minimum(1.0, ceiling / np.maximum(np.abs(audio), 1e-9))
    hold = ndimage.minimum_filter1d(needed, size=2 * ramp + 1, mode="nearest")
    gain = ndimage.uniform_filter1d(hold, size=2 * ramp + 1, mode="nearest")
    return (audio * np.minimum(gain, needed)).astype(np.float32)


def normalize_loudness(audio: np.ndarray, sample_rate: int, target_lufs: float
                       ) -> tuple[np.ndarray, float]:
    """Scales audio to target_lufs, limiting peaks to PEAK where the gain would clip.

    Returns:
      (float32 [time], measured integrated loudness in LUFS after scaling and limiting).
    """
    powers = block_powers(audio, sample_rate)
    gain = 10.0 ** ((target_lufs - gated_loudness(powers)) / 20.0)
    if np.abs(audio).max() * gain <= PEAK:
        return (audio * np.float32(gain)).astype(np.float32), gated_loudness(powers * gain**2)
    # Limiting lowers the loudness; a second pass makes up most of the difference.
    for _ in range(2):
        audio = limit(audio * np.float32(gain), sample_rate)
        powers = block_powers(audio, sample_rate)
        gain = 10.0 ** ((target_lufs - gated_loudness(powers)) / 20.0)
    gain = min(gain, PEAK / max(float(np.abs(audio).max()), 1e-9))
    return (audio * np.float32(gain)).astype(np.float32), gated_loudness(powers * gain**2)


def generate_example(seed: int, index: int, split: str, sample_rate: int = 16000,
                     seconds: float = 4.0, controls: bool = False) -> dict:
    """One captioned clip, a pure function of its arguments.

    Args:
      seed: dataset seed.
      index: example number within the split.
      split: split name ("train", "test", ...); different names give different examples.
      sample_rate: output rate in Hz.
      seconds: clip length.

      controls: clips whose level changes (a `dynamics` attribute, one of DYNAMICS) with the
        ground truth of their controls (see `render`); the captions are unchanged.

    Returns:
      {"audio": float32 [round(seconds * sample_rate)] in [-1, 1], "caption": str,
       "instrument", "key" ("" for drum_kit), "mode" ("" for drum_kit), "tempo_bpm": float,
       "pattern", "with_drums": bool, "loudness_db": measured LUFS, "loudness": str}, and with
      `controls` also "dynamics" and the ground-truth arrays of `render`.
    """
    if seconds <= 0 or sample_rate < 4000:
        raise ValueError(f"synthetic clips need seconds > 0 and sample_rate >= 4000, got "
                         f"seconds={seconds}, sample_rate={sample_rate}")
    sequence = np.random.SeedSequence([int(seed), zlib.crc32(split.encode()), int(index)])
    attribute_seq, music_seq, caption_seq = sequence.spawn(3)
    attribute_rng = np.random.default_rng(attribute_seq)
    attributes = sample_attributes(attribute_rng)
    caption = caption_for(attributes, np.random.default_rng(caption_seq))
    if not controls:
        audio, loudness_db = render(attributes, np.random.default_rng(music_seq),
                                    int(sample_rate), float(seconds))
        return {"audio": audio, "caption": caption, **attributes, "loudness_db": loudness_db}
    attributes["dynamics"] = DYNAMICS[attribute_rng.integers(len(DYNAMICS))]
    audio, loudness_db, truth = render(attributes, np.random.default_rng(music_seq),
                                       int(sample_rate), float(seconds), controls=True)
    return {"audio": audio, "caption": caption, **attributes, "loudness_db": loudness_db,
            **truth}
