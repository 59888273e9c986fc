"""Framing and overlap-add by reshapes and slices, the two halves of STFT analysis and synthesis.

A gather (`x[..., idx]`) would express framing in one line, but its gradient is a scatter that
accelerators run slowly. Splitting the signal into hop-sized blocks turns framing into
`ceil(frame_length / hop)` shifted slices and overlap-add into as many shifted sums: dense
slicing, padding and reshapes only, fast under `jit` and cheap to differentiate. Beyond
`_MAX_SLICES` slices (tiny hops) a gather is used instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_MAX_SLICES = 64


def _pad_last(x: jax.Array, before: int, after: int) -> jax.Array:
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(before, after)])


def frame(x: jax.Array, frame_length: int, hop: int, n_frames: int) -> jax.Array:
    """Frames `x[..., t]` into `[..., n_frames, frame_length]`, frame i starting at `i * hop`.

    Args:
      x: [..., time] with time >= (n_frames - 1) * hop + frame_length.
      frame_length: samples per frame.
      hop: samples between frame starts.
      n_frames: number of frames to cut.

    Returns:
      [..., n_frames, frame_length].
    """
    r = -(-frame_length // hop)
    if r > _MAX_SLICES:
        idx = np.arange(n_frames)[:, None] * hop + np.arange(frame_length)[None, :]
        return x[..., idx]
    n_blocks = n_frames + r - 1
    need = n_blocks * hop
    t = x.shape[-1]
    x = x[..., :need] if t >= need else _pad_last(x, 0, need - t)
    blocks = x.reshape(*x.shape[:-1], n_blocks, hop)
    if r == 1:
        return blocks[..., :n_frames, :frame_length]
    frames = jnp.concatenate([blocks[..., k:k + n_frames, :] for k in range(r)], axis=-1)
    return frames[..., :frame_length]


def overlap_add(frames: jax.Array, hop: int) -> jax.Array:
    """Sums frames placed `hop` apart (the adjoint of `frame`).

    Args:
      frames: [..., n_frames, frame_length].
      hop: samples between frame starts.

    Returns:
      [..., (n_frames - 1) * hop + frame_length].
    """
    n_frames, frame_length = frames.shape[-2:]
    out_len = (n_frames - 1) * hop + frame_length
    r = -(-frame_length // hop)
    lead = frames.shape[:-2]
    if r > _MAX_SLICES:
        idx = np.arange(n_frames)[:, None] * hop + np.arange(frame_length)[None, :]
        out = jnp.zeros((*lead, out_len), frames.dtype)
        return out.at[..., idx].add(frames)
    frames = _pad_last(frames, 0, r * hop - frame_length)
    blocks = frames.reshape(*lead, n_frames, r, hop)
    total = None
    for k in range(r):
        part = jnp.pad(blocks[..., k, :],
                       [(0, 0)] * len(lead) + [(k, r - 1 - k), (0, 0)])
        total = part if total is None else total + part
    return total.reshape(*lead, (n_frames + r - 1) * hop)[..., :out_len]
