"""The `ldm-jax` command.

Every command takes `--config FILE[:arg]` (default: the embedded `tiny` experiment) and any number
of `--config.a.b=value` overrides. Mistakes a user can make end in one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ldm_jax import config as config_lib

EPILOG = ("Config: --config FILE[:ARG] selects an experiment (a path or an embedded name such as "
          "`tiny`); --config.SECTION.KEY=VALUE overrides one field.")


def _add_config(p: argparse.ArgumentParser, workdir: bool = True, data_dir: bool = False):
    p.add_argument("--config", default=None, metavar="FILE[:ARG]",
                   help="experiment config file or embedded name (default: tiny)")
    if workdir:
        p.add_argument("--workdir", default=None, help="experiment directory (W)")
    if data_dir:
        p.add_argument("--data-dir", default=None,
                       help="TFDS data directory (default: the config's data.data_dir or W/data)")


def _data_dir(args, cfg) -> str:
    path = getattr(args, "data_dir", None) or cfg.data.data_dir or (
        os.path.join(args.workdir, "data") if getattr(args, "workdir", None) else "")
    if not path:
        raise config_lib.ConfigError("say where the data is: --data-dir D or --workdir W")
    return os.path.abspath(path)


# ---------------------------------------------------------------------------------------- data

def cmd_data_build(args, cfg):
    from ldm_jax.data import builders
    with cfg.unlocked():
        cfg.data.name = args.name
        if args.source:
            cfg.data.source = os.path.abspath(args.source)
    if args.name == "audio_folder" and not cfg.data.source:
        raise config_lib.ConfigError("audio_folder needs --source FOLDER (or --config.data.source)")
    summary = builders.build(args.name, cfg.data, _data_dir(args, cfg), overwrite=args.overwrite)
    print(builders.format_summary(summary))


def cmd_data_show(args, cfg):
    from ldm_jax.data import builders
    from ldm_jax.eval import plots
    data_dir = _data_dir(args, cfg)
    examples = builders.show(data_dir, args.name, args.split, args.num)
    for ex in examples:
        audio = ex.get("audio")
        attrs = {k: v for k, v in ex.items() if k not in ("audio", "caption")}
        seconds = (len(audio) / cfg.data.sample_rate) if audio is not None else 0.0
        print(f"[{ex.get('id', '?')}] {ex.get('caption', '') or '(no caption)'}")
        print("    " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(attrs.items()) if k != "id")
              + f", seconds={seconds:.2f}")
    png = args.png or os.path.join(data_dir, f"{args.name}_{args.split}.png")
    plots.save_log_mel_grid(png, [ex["audio"] for ex in examples],
                            [ex.get("caption", "") for ex in examples], cfg.data.sample_rate)
    print(f"log-mel spectrograms: {png}")


def _fmt(v):
    return f"{v:.1f}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------- tokenizer

def cmd_tokenizer_train(args, cfg):
    from ldm_jax.clap.text import Tokenizer
    from ldm_jax.data import builders
    source = builders.open_split(_data_dir(args, cfg), cfg.data.name, "train")
    captions = builders.captions(source)
    tok = Tokenizer.train(captions, vocab_size=cfg.tokenizer.vocab_size,
                          model_type=cfg.tokenizer.model_type)
    out = args.out or cfg.tokenizer.path or (
        os.path.join(args.workdir, "tokenizer", "spm.model") if args.workdir else "")
    if not out:
        raise config_lib.ConfigError("say where to write the tokenizer: --out PATH or --workdir W")
    tok.save(out)
    tokens, _ = tok.encode(captions[0], cfg.tokenizer.max_length)
    print(f"tokenizer: {out} ({tok.vocab_size} pieces, {len(captions)} captions)")
    print(f"  {captions[0]!r} -> {tokens.tolist()}")


# -------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm-jax", description="Latent diffusion for music and audio in JAX.", epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="build and inspect datasets", epilog=EPILOG)
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = data_sub.add_parser("build", help="materialise a TFDS dataset (ArrayRecord)",
                            epilog=EPILOG)
    p.add_argument("name", choices=("synthetic_music", "audio_folder"))
    p.add_argument("--source", default=None, help="audio_folder: the folder of audio files")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild even if a dataset with other parameters is there")
    _add_config(p, data_dir=True)
    p.set_defaults(func=cmd_data_build)
    p = data_sub.add_parser("show", help="print examples with captions; write a log-mel PNG",
                            epilog=EPILOG)
    p.add_argument("name", choices=("synthetic_music", "audio_folder"))
    p.add_argument("--split", default="train", choices=("train", "test"))
    p.add_argument("-n", "--num", type=int, default=4, help="how many examples")
    p.add_argument("--png", default=None, help="where to write the spectrograms")
    _add_config(p, data_dir=True)
    p.set_defaults(func=cmd_data_show)

    tok = sub.add_parser("tokenizer", help="caption tokenizer", epilog=EPILOG)
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    p = tok_sub.add_parser("train", help="train SentencePiece on the training captions",
                           epilog=EPILOG)
    p.add_argument("--out", default=None, help="model file (default: W/tokenizer/spm.model)")
    _add_config(p, data_dir=True)
    p.set_defaults(func=cmd_tokenizer_train)
    return parser


def _user_error(e: BaseException) -> bool:
    """Errors raised on purpose by ldm_jax for a user's mistake (their message says what to do)."""
    return isinstance(e, (ValueError, RuntimeError, FileNotFoundError, KeyError)) and \
        type(e).__module__.startswith("ldm_jax")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = config_lib.split_config_args(argv)
    except config_lib.ConfigError as e:
        print(f"ldm-jax: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(rest)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    try:
        cfg = config_lib.get_config(getattr(args, "config", None), overrides)
        args.func(args, cfg)
    except KeyboardInterrupt:
        print("ldm-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — one line for a user's mistake, a traceback otherwise
        if not _user_error(e):
            raise
        print(f"ldm-jax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
