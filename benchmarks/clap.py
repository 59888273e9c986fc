"""CLAP benchmark: contrastive train-step time and pairs/s; clip and caption embedding throughput.

    python benchmarks/clap.py --config clap_tiny --json out.json
    python benchmarks/clap.py --config clap_base --batch 256 --json out.json   # accelerator
    python benchmarks/clap.py --config clap_base --skip-speed   # parameter count only

The measurement is `benchmarks.run.bench_clap` (`ldm-jax bench clap`): the step is
`ldm_jax.clap.train.make_task(...).step` (InfoNCE over the batch, AdamW) on random clips of
`data.crop_seconds` and random captions of `model.text.max_length` tokens in the tokenizer's
layout (BOS, pieces, EOS, padding); the embedders are `clap.model.make_embedders` at
`eval.batch_size` on clips of `eval.crop_seconds`. Compile time is reported apart; then the
median of `--repeats` calls after one untimed call, each synchronised with `block_until_ready`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import hardware, run  # noqa: E402


def main(argv=None):
    from ldm_jax import config as config_lib
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="clap_tiny")
    p.add_argument("--batch", type=int, default=None, help="default: train.batch_size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-speed", action="store_true", help="only count the parameters")
    p.add_argument("--json", default=None)
    args, overrides = p.parse_known_args(argv)
    overrides = [o.removeprefix("--config.") for o in overrides]
    if args.skip_speed:
        cfg = config_lib.get_config(args.config, overrides)
        result = {"config": args.config, **hardware.environment(),
                  "dtype": str(cfg.model.dtype), **run.clap_params(cfg)}
    else:
        result = run.bench_clap(run.Options(preset=args.config, overrides=tuple(overrides),
                                            batch=args.batch, repeats=args.repeats))
    result = {"command": " ".join(sys.argv), **result}
    run.emit(result, args.json)


if __name__ == "__main__":
    main()
