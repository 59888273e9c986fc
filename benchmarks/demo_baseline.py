"""The demo's baseline: each stage's wall time and scores, for two or more seeds, in one JSON.

  python -m benchmarks.demo_baseline --seeds 0,1 --out benchmarks/demo_baseline.json

Each seed runs the embedded `tiny` chain (what `ldm-jax demo` runs) in a fresh process, from a
clean clone of the commit (`--commit`, default HEAD: uncommitted changes are not measured) into an
empty workdir, with no persistent compilation cache, so every stage time includes its compiles.
The training seeds of every stage are set to the seed; the dataset is the same for all seeds.
The record holds, per seed, each stage's seconds (from the chain's stage records) and the scores
of the codec, CLAP and generation evaluations, and over the seeds the range of every score: what
a later change to the demo is compared against.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from ldm_jax import provenance

STAGE_SEEDS = ("seed", "codec.seed", "clap.seed", "ldm.seed")
EVALS = {"codec": "codec/eval.json", "clap": "clap/eval.json",
         "generation": "samples/eval.json"}


def _scalars(d: dict, prefix: str = "") -> dict:
    """The numeric leaves of an evaluation JSON, with '/'-joined keys."""
    out = {}
    for k, v in d.items():
        if k == "provenance":
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_scalars(v, key + "/"))
        elif isinstance(v, bool):
            continue
        elif isinstance(v, int | float):
            out[key] = v
    return out


def run_seed(source: str, workdir: str, seed: int, overrides: list[str]) -> dict:
    """Runs the tiny chain with SEED from the checkout SOURCE; stage seconds and scores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["PYTHONPATH"] = source + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, "-m", "ldm_jax.cli", "run", "tiny", "--workdir", workdir]
    argv += [f"--config.{k}={seed}" for k in STAGE_SEEDS] + [f"--config.{o}" for o in overrides]
    start, load = time.time(), os.getloadavg()[0]
    subprocess.run(argv, cwd=source, env=env, check=True)
    total = time.time() - start
    stages = {}
    for name in sorted(os.listdir(os.path.join(workdir, "stages"))):
        with open(os.path.join(workdir, "stages", name)) as f:
            stages[name[:-len(".json")]] = json.load(f)["summary"].get("seconds")
    scores = {}
    for what, path in EVALS.items():
        with open(os.path.join(workdir, path)) as f:
            scores.update(_scalars(json.load(f), what + "/"))
    # Other work on the host skews the times: the load average before and after the run.
    return {"seed": seed, "wall_seconds": round(total, 1), "stage_seconds": stages,
            "load_average_1m": [round(load, 2), round(os.getloadavg()[0], 2)],
            "scores": scores}


def spread(runs: list[dict]) -> dict:
    """{score: [min, max]} over the seeds."""
    keys = sorted(set.intersection(*(set(r["scores"]) for r in runs)))
    return {k: [min(r["scores"][k] for r in runs), max(r["scores"][k] for r in runs)]
            for k in keys}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    p.add_argument("--commit", default="HEAD", help="the commit to measure")
    p.add_argument("--out", default="benchmarks/demo_baseline.json")
    p.add_argument("--root", default=None, help="where the clone and workdirs go (temporary)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every seed (e.g. ldm.train.steps=100)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    root = args.root or tempfile.mkdtemp(prefix="demo_baseline_")
    source = os.path.join(root, "src")
    if not os.path.isdir(source):
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", provenance.REPO, source],
                       check=True)
    subprocess.run(["git", "-C", source, "checkout", "-q", args.commit], check=True)
    commit = subprocess.run(["git", "-C", source, "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    runs = []
    for seed in seeds:
        print(f"demo_baseline: seed {seed} from {commit[:10]} in {root}", flush=True)
        runs.append(run_seed(source, os.path.join(root, f"seed{seed}"), seed, args.overrides))
    record = {"command": "python -m benchmarks.demo_baseline " + " ".join(argv or sys.argv[1:]),
              "measured_commit": commit, "overrides": args.overrides,
              "provenance": provenance.record(seeds=seeds), "runs": runs,
              "score_range": spread(runs)}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"demo_baseline: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
