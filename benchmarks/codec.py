"""Codec benchmark: G+D train-step time, clips/s, encode/decode real-time factor; Opus comparison.

    python benchmarks/codec.py --config codec_tiny --json out.json
    python benchmarks/codec.py --config codec:dac_44khz --batch 72 --json out.json   # accelerator
    python benchmarks/codec.py --workdir W --opus --json out.json   # trained codec vs Opus

Speed is `benchmarks.run.bench_codec` (`ldm-jax bench codec`): compile time apart, one untimed
call, then the median of `--repeats` calls, each synchronised with `block_until_ready`. The
Opus comparison encodes the same test clips with `opusenc` / `opusdec` (Debian's opus-tools) at
the codec's bitrate (Opus's 6 kbps floor where the codec is below it) and at double that, and
scores both with `ldm_jax.codec.inference.evaluate`'s metrics.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import hardware, run  # noqa: E402


def bench_speed(preset: str, overrides, batch: int | None, repeats: int) -> dict:
    """`benchmarks.run.bench_codec`: train step, clips/s, 10 s encode / decode RTF."""
    return run.bench_codec(run.Options(preset=preset, overrides=tuple(overrides), batch=batch,
                                       repeats=repeats))


def _opus_roundtrip(audio: np.ndarray, sr: int, kbps: float, tmp: str) -> np.ndarray:
    from ldm_jax.audio import io as audio_io
    wav, opus, out = (os.path.join(tmp, f) for f in ("in.wav", "x.opus", "out.wav"))
    audio_io.write_audio(wav, audio, sr)
    subprocess.run(["opusenc", "--quiet", "--bitrate", f"{kbps:g}", "--hard-cbr", wav, opus],
                   check=True)
    subprocess.run(["opusdec", "--quiet", "--rate", str(sr), opus, out], check=True)
    decoded, _ = audio_io.read_audio(out, sample_rate=sr)
    decoded = decoded[:, 0]
    if len(decoded) < len(audio):
        decoded = np.pad(decoded, (0, len(audio) - len(decoded)))
    return decoded[:len(audio)]


def bench_opus(workdir: str, data_dir: str | None, max_clips: int) -> dict:
    from ldm_jax.codec import inference
    from ldm_jax.codec.losses import mel_loss, multiscale_stft_loss, si_sdr, waveform_l1
    from ldm_jax.data import builders
    if not shutil.which("opusenc"):
        return {"error": "opusenc not found: apt-get install opus-tools"}
    loaded = inference.load_trained(workdir)
    sr = loaded.sample_rate
    data_dir = data_dir or os.path.join(workdir, "data")
    source = builders.open_split(data_dir, "synthetic_music", "test")
    clips = [np.asarray(source[i]["audio"], np.float32).reshape(-1)
             for i in range(min(max_clips, len(source)))]
    ours = inference.evaluate(loaded, clips)
    rows = {"ldm_jax": ours}
    base = max(ours["bitrate_kbps"] or 6.0, 6.0)
    for kbps in (base, 2 * base):
        with tempfile.TemporaryDirectory() as tmp:
            decoded = [_opus_roundtrip(c, sr, kbps, tmp) for c in clips]
        x = jnp.asarray(np.stack(clips))[..., None]
        y = jnp.asarray(np.stack(decoded))[..., None]
        rows[f"opus_{kbps:g}kbps"] = {
            "bitrate_kbps": kbps, "mel_distance": float(mel_loss(y, x, sr)),
            "stft_distance": float(multiscale_stft_loss(y, x)),
            "si_sdr": float(jnp.mean(si_sdr(y, x))), "waveform_l1": float(waveform_l1(y, x)),
            "num_clips": len(clips)}
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="codec_tiny")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default=None, help="a trained codec, for --opus")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--opus", action="store_true", help="compare a trained codec with Opus")
    p.add_argument("--max-clips", type=int, default=32)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--json", default=None)
    args, overrides = p.parse_known_args(argv)
    overrides = [o.removeprefix("--config.") for o in overrides]
    result = {"command": " ".join(sys.argv), "config": args.config, **hardware.environment()}
    if not args.skip_speed:
        result["speed"] = bench_speed(args.config, overrides, args.batch, args.repeats)
    if args.opus:
        if not args.workdir:
            p.error("--opus needs --workdir W with a trained codec")
        result["opus"] = bench_opus(args.workdir, args.data_dir, args.max_clips)
    run.emit(result, args.json)


if __name__ == "__main__":
    main()
