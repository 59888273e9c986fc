"""Musical control features, written controls and control metrics, shared by every family.

- `features`: melody (high-passed chroma, one-hot, soft, voicing), dynamics (smoothed dB) and
  onset strength, pure JAX, differentiable, one jitted `extract` per clip or batch;
- `beats`: beats, downbeats and their frame activations;
- `symbolic`: the same controls from MIDI, and dynamics from a CSV curve;
- `metrics`: melody accuracy, dynamics correlation, beat/downbeat F1 (`mir_eval`);
- `analysis`: controls of a file in one form, JSON and plot (`ldm-jax controls extract`).
"""

from ldm_jax.controls.analysis import controls_from_audio, controls_from_file, to_json
from ldm_jax.controls.beats import activation, beat_grid, estimate_downbeats, track_beats
from ldm_jax.controls.features import (
    ControlsError,
    FeatureConfig,
    dynamics,
    extract,
    melody,
    onset_strength,
)
from ldm_jax.controls.metrics import (
    beat_f1,
    dynamics_correlation,
    melody_accuracy,
    pooled_dynamics_correlation,
)
from ldm_jax.controls.symbolic import controls_from_midi, dynamics_from_csv, melody_from_notes

__all__ = ["ControlsError", "FeatureConfig", "activation", "beat_f1", "beat_grid",
           "controls_from_audio", "controls_from_file", "controls_from_midi", "dynamics",
           "dynamics_correlation", "dynamics_from_csv", "estimate_downbeats", "extract",
           "melody", "melody_accuracy", "melody_from_notes", "onset_strength",
           "pooled_dynamics_correlation", "to_json", "track_beats"]
