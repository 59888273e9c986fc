"""What a measurement ran on, and what the hardware could do: peak FLOP/s, MFU, memory.

Model FLOPs utilisation (MFU, Chowdhery et al., "PaLM", 2022, appendix B) is achieved FLOP/s over
the device's peak dense bfloat16 FLOP/s. The FLOPs of a step are XLA's own count
(`compiled.cost_analysis()`), so a rematerialised forward pass counts twice, and a `while` loop
(`lax.scan`) counts its body once whatever its trip count.
"""

from __future__ import annotations

import datetime
import os
import platform
import re

import jax

# Peak dense bfloat16 FLOP/s per device (one chip, or one GPU), from the vendors' data sheets.
# Checked in order against the normalised `device_kind`; the more specific names come first.
PEAK_BF16_FLOPS = (
    (r"v6\s*(lite|e)\b", "TPU v6e", 918e12),
    (r"v5\s*(lite|e)\b|v5litepod", "TPU v5e", 197e12),
    (r"v5\s*p\b|\bv5\b", "TPU v5p", 459e12),
    (r"\bv4\b(?!\s*lite)", "TPU v4", 275e12),
    (r"h200", "NVIDIA H200", 989e12),
    (r"h100.*pcie", "NVIDIA H100 PCIe", 756e12),
    (r"h100", "NVIDIA H100", 989e12),
    (r"a100", "NVIDIA A100", 312e12),
)


def _normalise(kind: str) -> str:
    return " ".join(re.sub(r"[-_]", " ", kind.lower()).split())


def lookup_peak_flops(device_kind: str) -> tuple[str, float] | None:
    """(table name, peak bf16 FLOP/s) of a `jax.Device.device_kind`, or None if not in the table.

    Examples: "TPU v5 lite" -> TPU v5e; "NVIDIA H100 80GB HBM3" -> NVIDIA H100.
    """
    kind = _normalise(device_kind)
    for pattern, name, flops in PEAK_BF16_FLOPS:
        if re.search(pattern, kind):
            return name, flops
    return None


def peak_flops(device_kind: str, override_tflops: float | None = None
               ) -> tuple[float | None, str]:
    """The peak FLOP/s that MFU is taken against, and where it came from.

    Args:
      device_kind: `jax.devices()[0].device_kind`.
      override_tflops: a peak in TFLOP/s given by the user (wins over the table).

    Returns:
      (peak FLOP/s or None, source): None on CPUs and unknown devices unless overridden.
    """
    if override_tflops is not None:
        return float(override_tflops) * 1e12, "--peak-tflops"
    found = lookup_peak_flops(device_kind)
    if found is None:
        return None, f"unknown device kind {device_kind!r}: give --peak-tflops"
    return found[1], f"table: {found[0]} dense bfloat16"


def mfu(flops_per_step: float | None, step_seconds: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over peak FLOP/s; None when either count is unknown."""
    if not flops_per_step or not peak or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / peak


def cost_flops(cost) -> float | None:
    """FLOPs from `Compiled.cost_analysis()` / `Lowered.cost_analysis()`.

    JAX versions return a dict, a list of per-program dicts, or None; the list is summed.
    """
    if cost is None:
        return None
    parts = cost if isinstance(cost, (list, tuple)) else [cost]
    total = sum(float(p.get("flops", 0.0)) for p in parts if p)
    return total if total > 0 else None


def peak_memory(compiled, device: jax.Device | None = None) -> tuple[int | None, str]:
    """Peak device memory in bytes and its source.

    The allocator's `peak_bytes_in_use` where the runtime keeps one (GPU, TPU: the process's peak
    so far, across everything measured before); else XLA's static estimate of the compiled
    program (arguments + outputs + temporaries, outputs that reuse a donated argument's buffer
    counted once), which is what a CPU gets.
    """
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 — some backends raise instead of returning None
        stats = None
    if stats and stats.get("peak_bytes_in_use"):
        return int(stats["peak_bytes_in_use"]), "device.memory_stats()['peak_bytes_in_use']"
    from ldm_jax.parallel import memory_estimate

    total = memory_estimate(compiled)
    if total is None:
        return None, "unavailable"
    return total, "compiled.memory_analysis(): argument + output - aliased + temp bytes"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment() -> dict:
    """The commit, the device, the library versions, the date and how busy the host was."""
    import flax
    import numpy as np

    from ldm_jax import provenance

    device = jax.devices()[0]
    return {
        **provenance.commit(), "versions": provenance.versions(),
        "device_kind": device.device_kind, "device_count": jax.device_count(),
        "platform": device.platform, "jax": jax.__version__, "flax": flax.__version__,
        "numpy": np.__version__, "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "machine": {"host": platform.platform(), "processor": cpu_model(),
                    "cpu_count": os.cpu_count(),
                    # Other work on the host skews timings; record how busy it was.
                    "load_average_1m": round(os.getloadavg()[0], 1)},
    }
