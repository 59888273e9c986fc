"""Timing shared by the benchmark scripts: compile separately, then the median of synced calls."""

import statistics
import time

import jax


def timed(fn, *args, repeats: int):
    """Returns (output, first-call seconds (compile + run), median seconds of `repeats` calls)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, compile_s, statistics.median(times)


def timed_steps(step, state, batch, rng, *, repeats: int):
    """Times a donating `state, batch, rng -> (state, metrics)` step, threading the state.

    Returns:
      (final state, first-call seconds (compile + run), median seconds of `repeats` steps).
    """
    start = time.perf_counter()
    state, _ = jax.block_until_ready(step(state, batch, rng))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(step(state, batch, rng))
        times.append(time.perf_counter() - start)
    return state, compile_s, statistics.median(times)
