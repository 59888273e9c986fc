"""The benchmark suite (`benchmarks.run`, `ldm-jax bench`): MFU arithmetic, the device table,
every target on tiny presets writing complete records, and the PyTorch peers timed beside the
U-Net and codec steps (`--peer`, skipped without torch).

Models are shrunk by config overrides and compiled at XLA's lowest backend optimisation level,
so each target compiles in seconds; the numbers are checked for presence and sign, never for
speed.
"""

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks import hardware, run  # noqa: E402
from ldm_jax import cli  # noqa: E402

try:
    import torch
except ImportError:
    torch = None

FAST = {"xla_backend_optimization_level": 0}
COMMON_KEYS = ("target", "preset", "device_kind", "device_count", "platform", "jax", "flax",
               "date", "batch", "compile_s", "step_s", "examples_per_s", "flops_per_step",
               "flops_per_s", "peak_flops", "mfu", "peak_memory_bytes", "peak_memory_source")
UNET = ("model.base_channels=16", "model.channel_mult=(1,)", "model.attention_levels=()",
        "model.num_heads=2", "model.norm_groups=8", "model.context_dim=32", "model.pooled_dim=16",
        "tokenizer.max_length=8", "diffusion.num_train_timesteps=100")
CODEC = ("model.encoder_rates=(2,)", "model.decoder_rates=(2,)", "model.encoder_dim=4",
         "model.decoder_dim=8", "model.latent_dim=8", "model.codebook_size=16",
         "model.n_codebooks=1", "discriminator.channels=2", "discriminator.max_channels=8",
         "discriminator.periods=()", "discriminator.fft_sizes=(128,)", "data.crop_seconds=0.07")


def options(**kw):
    return run.Options(repeats=1, peak_tflops=1.0, compiler_options=FAST, **kw)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_record(r, target, *, compiled=True):
    for key in COMMON_KEYS:
        assert key in r, key
    assert r["target"] == target and r["device_count"] == jax.device_count()
    assert r["platform"] == "cpu" and r["peak_flops"] == 1e12
    assert set(r["step_s"]) == {"median", "min", "max"}
    assert r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
    numbers = [r["step_s"]["median"], r["examples_per_s"]]
    if compiled:
        numbers += [r["compile_s"], r["flops_per_step"], r["flops_per_s"], r["mfu"],
                    r["peak_memory_bytes"]]
        assert r["flops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"]["median"])
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / 1e12)
        assert r["peak_memory_source"].startswith("compiled.memory_analysis")
    assert all(positive(x) for x in numbers), numbers
    json.dumps(r)  # JSON-ready


def check_peer(r, threads):
    peer = r["peer"]
    assert peer["device"] == "cpu" and peer["threads"] == threads
    assert positive(peer["step_s"]) and positive(peer["examples_per_s"])
    assert r["speed_ratio_vs_peer"] == pytest.approx(r["examples_per_s"] / peer["examples_per_s"])


# ------------------------------------------------------------------------------ arithmetic

@pytest.mark.parametrize("kind, name, peak", [
    ("TPU v4", "TPU v4", 275e12), ("TPU v5 lite", "TPU v5e", 197e12),
    ("TPU v5e", "TPU v5e", 197e12), ("TPU v5litepod", "TPU v5e", 197e12),
    ("TPU v5", "TPU v5p", 459e12), ("TPU v5p", "TPU v5p", 459e12),
    ("TPU v6 lite", "TPU v6e", 918e12), ("TPU v6e", "TPU v6e", 918e12),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100", 312e12),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100", 989e12), ("NVIDIA H200", "NVIDIA H200", 989e12)])
def test_device_table(kind, name, peak):
    assert hardware.lookup_peak_flops(kind) == (name, peak)
    value, source = hardware.peak_flops(kind)
    assert value == peak and name in source


def test_peak_override_and_unknown_devices():
    assert hardware.lookup_peak_flops("cpu") is None
    assert hardware.lookup_peak_flops("TPU v4 lite") is None
    value, source = hardware.peak_flops("cpu")
    assert value is None and "--peak-tflops" in source
    assert hardware.peak_flops("cpu", 2.5) == (2.5e12, "--peak-tflops")
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3", 100.0)[0] == 1e14


def test_mfu_and_cost_analysis_forms():
    assert hardware.mfu(2e12, 0.5, 8e12) == pytest.approx(0.5)
    assert hardware.mfu(None, 0.5, 8e12) is None
    assert hardware.mfu(2e12, 0.5, None) is None
    assert hardware.cost_flops({"flops": 6.0, "bytes accessed": 1.0}) == 6.0
    assert hardware.cost_flops([{"flops": 1.0}, {"flops": 2.0}]) == 3.0
    assert hardware.cost_flops(None) is None and hardware.cost_flops([{}]) is None
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 16)), jnp.ones((16, 4))).compile()
    assert hardware.cost_flops(compiled.cost_analysis()) == 2 * 8 * 16 * 4
    memory, source = hardware.peak_memory(compiled)
    assert memory == (8 * 16 + 16 * 4 + 8 * 4) * 4 and "memory_analysis" in source


# ------------------------------------------------------------------------------ the targets

def test_data(tmp_path):
    r = run.run("data", options(preset="tiny", batch=2, data_dir=str(tmp_path), overrides=(
        "data.num_train=6", "data.num_test=2", "data.clip_seconds=0.5", "data.crop_seconds=0.25")))
    check_record(r, "data", compiled=False)
    assert r["compile_s"] is None and r["mfu"] is None and positive(r["mb_per_s"])
    assert r["num_train"] == 6 and r["batch"] == 2


def test_codec():
    # With PyTorch, the DAC peer is timed beside the step (one codec compilation for both).
    r = run.run("codec", options(batch=2, seconds=0.1, overrides=CODEC, peer=torch is not None,
                                 peer_threads=1))
    check_record(r, "codec")
    if torch is not None:
        check_peer(r, 1)
        assert r["peer"]["samples"] == round(0.07 * 16000)
        assert r["peer"]["params"] == r["params"]
    assert r["crop_seconds"] == pytest.approx(0.07) and positive(r["params"])
    for part in ("encode", "decode"):
        assert positive(r[part]["rtf"]) and positive(r[part]["compile_s"])


def test_clap():
    r = run.run("clap", options(batch=2, remat=True, overrides=(
        "data.sample_rate=8000", "data.crop_seconds=0.25", "tokenizer.vocab_size=96",
        "tokenizer.max_length=8", "model.embed_dim=16", "model.text.width=32",
        "model.text.num_layers=1", "model.text.num_heads=2", "model.audio.width=32",
        "model.audio.num_layers=1", "model.audio.num_heads=2", "model.audio.max_seconds=0.5",
        "model.audio.n_fft=256", "model.audio.hop_length=128", "model.audio.n_mels=16",
        "eval.batch_size=2")))
    check_record(r, "clap")
    assert r["remat"] is True and r["params"] == r["text_params"] + r["audio_params"] + 1
    assert positive(r["embed_text"]["examples_per_s"])
    assert positive(r["embed_audio"]["examples_per_s"])


def test_sample_doubles_the_batch():
    # The chain experiment carries its codec, so the decoder shrinks with it.
    r = run.run("sample", options(
        preset="tiny", seconds=0.05, steps=2, max_batch=2, dtype="float32",
        overrides=tuple(f"ldm.{o}" for o in UNET) + (
            "codec.model.decoder_dim=16", "codec.model.encoder_dim=4")))
    check_record(r, "sample")
    assert r["frame_rate"] == 50.0 and r["frames"] == 3 and r["steps"] == 2
    assert [row["batch"] for row in r["rows"]] == [1, 2] and r["largest_batch"] == 2
    for row in r["rows"]:
        assert all(positive(row[k]) for k in ("rtf", "rtf_sampler", "rtf_decode", "mfu",
                                              "flops_per_generation"))
        assert row["total_s"]["median"] > 0
    assert r["rtf"] == pytest.approx(0.05 / r["step_s"]["median"])


# ------------------------------------------------------------------------------ the command

def test_cli_bench_unet_writes_json(tmp_path, capsys):
    out = tmp_path / "unet.json"
    rc = cli.main(["bench", "unet", "--preset", "ldm_tiny", "--batch", "2", "--repeats", "1",
                   "--peak-tflops", "1", "--remat", "on", "--json", str(out),
                   "--xla-option", "xla_backend_optimization_level=0",
                   *(f"--config.{o}" for o in UNET), "--config.data.crop_seconds=0.05"])
    assert rc == 0
    assert "unet ldm_tiny: batch 2" in capsys.readouterr().out
    r = json.loads(out.read_text())
    check_record(r, "unet")
    assert r["frames"] == 20 and r["frame_rate"] == 400.0 and r["context_length"] == 8
    assert r["remat"] is True and r["overrides"][-1] == "data.crop_seconds=0.05"
    # Rematerialisation recomputes the forward pass: XLA counts more than the model's work.
    assert 0 < r["flops_per_step_without_remat"] < r["flops_per_step"]


@pytest.mark.parametrize("argv, message", [
    (["bench", "unet", "--preset", "no_such_preset"], "not found"),
    (["bench", "unet", "--preset", "codec_tiny"], "has no ldm model"),
    (["bench", "codec", "--remat", "on"], "no remat option"),
    (["bench", "all", "--preset", "ldm_tiny"], "drop --preset"),
    (["bench", "clap", "--peer"], "has no PyTorch peer"),
])
def test_cli_bench_user_errors_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ldm-jax: error:") and message in err and "\n" not in err


# ------------------------------------------------------------------------------ PyTorch peers

@pytest.mark.skipif(torch is None, reason="needs PyTorch")
def test_unet_peer_is_timed_beside_ours(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "unet.json"
    rc = cli.main(["bench", "unet", "--preset", "ldm_tiny", "--batch", "2", "--repeats", "1",
                   "--peak-tflops", "1", "--peer", "--peer-threads", "1", "--json", str(out),
                   "--xla-option", "xla_backend_optimization_level=0",
                   *(f"--config.{o}" for o in UNET), "--config.data.crop_seconds=0.05"])
    assert rc == 0 and "ours/peer" in capsys.readouterr().out
    r = json.loads(out.read_text())
    check_record(r, "unet")
    check_peer(r, 1)
    # The same network on both sides.
    assert r["peer"]["params"] == r["params"]
    assert torch.get_num_threads() == threads
    with pytest.raises(run.ConfigError, match="no patch_size"):
        run.run("unet", options(preset="ldm_tiny", peer=True, overrides=("model.patch_size=2",)))


def test_peer_errors_are_one_line(monkeypatch, capsys):
    with pytest.raises(run.ConfigError, match="not tpu"):
        run.peer_device("tpu", {})
    with pytest.raises(run.ConfigError, match="XLA_PYTHON_CLIENT_PREALLOCATE=false"):
        run.peer_device("gpu", {})
    assert run.peer_device("gpu", {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}) == "cuda"
    assert run.peer_device("cpu", {}) == "cpu"
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    assert cli.main(["bench", "unet", "--peer"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--peer needs PyTorch" in err and "\n" not in err


def test_demo_baseline_collects_numeric_scores_and_their_range():
    from benchmarks import demo_baseline

    scores = demo_baseline._scalars({"fd_clap": 0.7, "n": 3, "ok": True, "name": "x",
                                     "untrained": {"fd_clap": 1.5},
                                     "provenance": {"devices": {"count": 1}}}, "generation/")
    assert scores == {"generation/fd_clap": 0.7, "generation/n": 3,
                      "generation/untrained/fd_clap": 1.5}
    runs = [{"scores": {"a": 1.0, "b": 2.0}}, {"scores": {"a": 3.0}}]
    assert demo_baseline.spread(runs) == {"a": [1.0, 3.0]}
