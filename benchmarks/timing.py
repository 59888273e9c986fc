"""Timing shared by the benchmarks: ahead-of-time compilation timed apart, then synced calls.

A function is lowered and compiled once (`jax.jit(f).lower(*args).compile()`), so compile time
never mixes with run time; the compiled executable then runs `warmup` untimed calls and `repeats`
timed calls, each ended by `jax.block_until_ready`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import jax


def compile_jit(fn, *args, donate_argnums: Sequence[int] = (),
                compiler_options: dict | None = None):
    """Compiles `jax.jit(fn)` for `args` ahead of time.

    Args:
      fn: the function.
      *args: example arguments (arrays or pytrees; only their shapes and dtypes matter).
      donate_argnums: arguments whose buffers the call may reuse (a train state).
      compiler_options: XLA options for this compilation (None: XLA's defaults).

    Returns:
      (compiled executable, lowered computation, seconds spent lowering and compiling).
    """
    start = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=tuple(donate_argnums)).lower(*args)
    compiled = lowered.compile(compiler_options=compiler_options)
    return compiled, lowered, time.perf_counter() - start


def time_calls(fn, *args, repeats: int, warmup: int = 1):
    """Times `fn(*args)`: `warmup` untimed calls, then `repeats` synced calls.

    Returns:
      (last output, list of `repeats` seconds).
    """
    out = None
    for _ in range(warmup):
        out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, times


def time_steps(step, state, *args, repeats: int, warmup: int = 1):
    """Times a donating `state, *args -> (state, metrics)` step, threading the state.

    Returns:
      (final state, list of `repeats` seconds).
    """
    for _ in range(warmup):
        state, _ = jax.block_until_ready(step(state, *args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(step(state, *args))
        times.append(time.perf_counter() - start)
    return state, times


def summarize(times: Sequence[float]) -> dict:
    """{"median", "min", "max"} seconds of a list of timings."""
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}
