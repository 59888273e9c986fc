"""Time of the control features of one clip: `ldm_jax.controls.extract`, one jitted call.

  python -m benchmarks.controls_extract --seconds 10 --repeats 20 --out controls_extract.json

Compiles `extract` for a clip of --seconds at 16 kHz (50 frames/s, the `tiny` codec's rate)
ahead of time, then times --repeats synced calls (and, apart, the host-side beat tracking that
`controls_from_audio` adds). The JSON records the command's settings, the compile time, the
median/min/max of the calls and the provenance (commit, versions, device).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks import timing
from ldm_jax import controls, provenance
from ldm_jax.controls.beats import estimate_downbeats, track_beats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    cfg = controls.FeatureConfig(sample_rate=16000, frame_rate=50)
    clip = (0.1 * np.random.default_rng(0).standard_normal(int(args.seconds * 16000))
            ).astype(np.float32)
    compiled, _, compile_s = timing.compile_jit(lambda x: controls.extract(x, cfg), clip)
    out, times = timing.time_calls(compiled, clip, repeats=args.repeats)
    onset = np.asarray(out["onset"])
    host = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        beats = track_beats(onset, cfg)
        estimate_downbeats(beats, onset, cfg, harmony=np.asarray(out["harmony"]))
        host.append(time.perf_counter() - start)
    record = {"command": "python -m benchmarks.controls_extract "
                         f"--seconds {args.seconds:g} --repeats {args.repeats}",
              "seconds_of_audio": args.seconds, "sample_rate": 16000, "frame_rate": 50,
              "repeats": args.repeats, "compile_s": compile_s,
              "extract_s": timing.summarize(times), "beat_tracking_s": timing.summarize(host),
              "provenance": provenance.record()}
    print(json.dumps({k: v for k, v in record.items() if k != "provenance"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
