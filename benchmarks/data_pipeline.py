"""Input-pipeline throughput: clips/s of the grain pipeline over the synthetic_music dataset.

Reads `synthetic_music` (4 s clips at 16 kHz) through `ldm_jax.data.pipeline.make_iterator` in
training mode (shuffle, crop, batch 32) with full 4 s crops and random 1 s crops, in this process
and with worker processes, and reports clips/s and MB/s of float32 audio delivered. Builds the
dataset into a temporary directory unless --data-dir holds one.

    python benchmarks/data_pipeline.py --json benchmarks/results/data_pipeline.json
    python benchmarks/data_pipeline.py --data-dir /data/tfds --workers 0,2,8 --batches 100
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from benchmarks import hardware, run  # noqa: E402
from ldm_jax.data import builders  # noqa: E402


def data_config(args) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="synthetic_music", sample_rate=args.sample_rate, channels=1,
        clip_seconds=args.clip_seconds, num_train=args.num_train, num_test=8, seed=0,
        crop_seconds=1.0, shuffle_seed=0, worker_count=0, worker_buffer_size=2))


def measure(source, cfg, *, batch_size, crop_seconds, workers, batches, warmup) -> dict:
    """Times `batches` batches after `warmup` batches (worker start-up is in the warm-up)."""
    times, nbytes = run.pipeline_batch_times(source, cfg, batch_size=batch_size,
                                             crop_seconds=crop_seconds, workers=workers,
                                             batches=batches, warmup=warmup)
    elapsed = sum(times)
    clips = batches * batch_size
    return {"crop_seconds": crop_seconds, "workers": workers, "batch_size": batch_size,
            "batches": batches, "seconds": round(elapsed, 3),
            "clips_per_s": round(clips / elapsed, 1), "mb_per_s": round(nbytes / elapsed / 1e6, 1)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="", help="TFDS dir with synthetic_music (built "
                        "there if absent); default: a temporary directory")
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--clip-seconds", type=float, default=4.0)
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--crops", default="4.0,1.0", help="crop lengths in seconds")
    parser.add_argument("--workers", default="0,2", help="worker process counts")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    cfg = data_config(args)

    with tempfile.TemporaryDirectory(prefix="ldm_jax_bench_") as tmp:
        data_dir = args.data_dir or tmp
        start = time.perf_counter()
        summary = builders.build("synthetic_music", cfg, data_dir, print_fn=None)
        build_seconds = time.perf_counter() - start
        source = builders.open_split(data_dir, "synthetic_music", "train")
        load = os.getloadavg()[0]
        rows = []
        for crop in (float(c) for c in args.crops.split(",")):
            for workers in (int(w) for w in args.workers.split(",")):
                rows.append(measure(source, cfg, batch_size=args.batch_size, crop_seconds=crop,
                                    workers=workers, batches=args.batches, warmup=args.warmup))

    built = "already built" if summary["already_built"] else f"built in {build_seconds:.1f} s"
    print(f"synthetic_music: {len(source)} clips of {args.clip_seconds} s at {args.sample_rate} Hz"
          f" ({built})")
    print(f"{'crop s':>7} {'workers':>8} {'batch':>6} {'clips/s':>9} {'MB/s':>7}")
    for r in rows:
        print(f"{r['crop_seconds']:>7.1f} {r['workers']:>8d} {r['batch_size']:>6d} "
              f"{r['clips_per_s']:>9.1f} {r['mb_per_s']:>7.1f}")
    if args.json:
        report = {
            "benchmark": "data_pipeline",
            "date": datetime.date.today().isoformat(),
            "machine": {"platform": platform.platform(), "processor": hardware.cpu_model(),
                        "cpu_count": os.cpu_count(),
                        # Other work on the machine skews throughput; record how busy it was.
                        "load_average_1m": round(load, 1)},
            "versions": {"python": platform.python_version(), "numpy": np.__version__,
                         "jax": jax.__version__, "grain": getattr(grain, "__version__", "?"),
                         "tensorflow_datasets": tfds.__version__},
            "dataset": {"num_train": len(source), "clip_seconds": args.clip_seconds,
                        "sample_rate": args.sample_rate, "build_seconds": round(build_seconds, 1)},
            "results": rows,
        }
        run.write_json(report, args.json)
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
