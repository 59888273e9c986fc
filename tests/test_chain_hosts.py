"""The whole `tiny` chain as two JAX hosts, and the commands that read its models on two hosts.

`launch/local.sh --processes 2 --cpu-devices 2` runs every stage, data through report, at tiny
step counts, with every evaluation on (each sees at least two batches per host: 8 test clips or
prompts in batches of 2, CLAP also evaluated during training, codec and U-Net media logged). The
same chain in one process of 4 devices is the reference: the two-host workdir must hold the same
outputs, and the codec, trained on the same global batches over as many devices, the same
parameters up to float rounding.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

from ldm_jax import checkpoint

HERE = os.path.dirname(__file__)
REPO = os.path.dirname(HERE)
_spec = importlib.util.spec_from_file_location("toy_train_main",
                                               os.path.join(HERE, "toy_train_main.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

OVERRIDES = [
    "data.num_train=16", "data.num_test=8", "data.clip_seconds=1.0",
    "codec.train.steps=4", "codec.train.disc_start=2", "codec.train.batch_size=4",
    "codec.checkpoint.every_steps=2", "codec.log.every_steps=2", "codec.log.audio_every_steps=4",
    "codec.eval.num_examples=8", "codec.eval.batch_size=2",
    # One period and one resolution discriminator: half the codec step's compile time.
    "codec.discriminator.periods=(2,)", "codec.discriminator.fft_sizes=(256,)",
    "clap.train.steps=4", "clap.train.batch_size=4", "clap.train.warmup=1",
    "clap.eval.batch_size=2", "clap.eval.every_steps=2", "clap.log.every_steps=2",
    "clap.checkpoint.every_steps=2",
    "ldm.train.steps=4", "ldm.train.batch_size=4", "ldm.log.every_steps=2",
    "ldm.log.audio_every_steps=4", "ldm.checkpoint.every_steps=2", "ldm.data.crop_seconds=1.0",
    "ldm.generation.seconds=1.0", "ldm.generation.steps=2", "ldm.generation.media_steps=2",
    "ldm.generation.batch_size=2", "ldm.eval.num_prompts=8", "ldm.eval.steps=2",
    "ldm.eval.batch_size=2", "ldm.eval.seconds=1.0",
]
TIMEOUT = 1500  # seconds per chain run; one takes about 4 minutes on 2 CPU cores


def environment() -> dict:
    env = toy.child_env()
    env.pop("XLA_FLAGS")  # local.sh sets the device count
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def local_sh(workdir, processes: int, devices: int):
    """`launch/local.sh` running the tiny chain; returns (exit code, output)."""
    argv = ["bash", os.path.join(REPO, "launch", "local.sh"), "--processes", str(processes),
            "--cpu-devices", str(devices), "--experiment", "tiny", "--workdir", str(workdir),
            "--port", str(toy.free_port()), "--"] + [f"--config.{o}" for o in OVERRIDES]
    proc = subprocess.Popen(argv, env=environment(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -1, output
    return proc.returncode, output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain_hosts")
    out = {}
    for name, processes, devices in (("two", 2, 2), ("one", 1, 4)):
        code, output = local_sh(root / name, processes, devices)
        logs = "".join(f"\n--- {p} ---\n" + p.read_text()[-3000:]
                       for p in sorted((root / name / "logs" / "launch").glob("*.log")))
        assert code == 0, f"{name}: exit {code}\n{output[-3000:]}{logs}"
        out[name] = root / name
    return out


def outputs(workdir) -> set[str]:
    """The files of a workdir, with what depends on the number of hosts folded away: orbax's
    array files and per-host iterator states inside each step, shard counts, TensorBoard file
    names and the launcher's own logs."""
    names = set()
    for path in workdir.rglob("*"):
        if not path.is_file():
            continue
        name = path.relative_to(workdir).as_posix()
        if name.startswith("logs/launch/"):
            continue
        name = re.sub(r"(checkpoints/\d+)/.*", r"\1/", name)
        name = re.sub(r"-\d{5}-of-\d{5}$", "-*", name)
        name = re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents.*", name)
        names.add(name)
    return names


def test_two_hosts_write_what_one_host_writes(runs):
    two, one = outputs(runs["two"]), outputs(runs["one"])
    assert two == one
    for expected in ("report.html", "samples/samples.json", "samples/eval.json",
                     "codec/eval.json", "clap/eval.json", "latents/stats.json",
                     "codec/checkpoints/4/", "ldm/checkpoints/4/",
                     "logs/codec/events.out.tfevents.*", "logs/ldm/events.out.tfevents.*"):
        assert expected in two, expected
    assert sorted(p.name for p in (runs["two"] / "logs" / "launch").iterdir()) == [
        "process_0.log", "process_1.log"]
    index = json.loads((runs["two"] / "samples" / "samples.json").read_text())
    assert len(index) == 6 and all((runs["two"] / "samples" / s["file"]).is_file()
                                   for s in index)


def test_every_evaluation_ran_on_two_hosts(runs):
    w = runs["two"]
    assert json.loads((w / "codec" / "eval.json").read_text())["num_clips"] == 8
    generation = json.loads((w / "samples" / "eval.json").read_text())
    assert generation["num_prompts"] == 8 and "untrained/fd_clap" in generation
    clap_rows = [json.loads(line) for line in (w / "clap" / "metrics.jsonl").open()]
    assert [r["step"] for r in clap_rows if "eval/zero_shot/instrument" in r] == [2, 4]
    clap = json.loads((w / "clap" / "eval.json").read_text())
    assert clap["chance/recall_at_1"] == pytest.approx(1 / 8)
    # The codec evaluates the same clips with nearly the same parameters on one host.
    reference = json.loads((runs["one"] / "codec" / "eval.json").read_text())
    codec = json.loads((w / "codec" / "eval.json").read_text())
    assert codec["mel_distance"] == pytest.approx(reference["mel_distance"], rel=1e-3)
    # Each evaluation records what made it: two processes of two devices here, one of four there.
    for made, processes in ((codec, 2), (reference, 1)):
        assert made["provenance"]["devices"]["process_count"] == processes
        assert made["provenance"]["devices"]["count"] == 4
        assert made["provenance"]["seeds"] == {"codec_seed": 0}
    assert generation["provenance"]["versions"]["jax"] == jax.__version__


def test_codec_parameters_equal_one_hosts(runs):
    def params(workdir, step):
        state, _ = checkpoint.read_state(str(workdir / "codec" / "checkpoints"), step)
        return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(state["params"])])

    two, one, one_before = params(runs["two"], 4), params(runs["one"], 4), params(runs["one"], 2)
    # Float rounding only: reductions over 2 x 2 devices add in another order than over 4.
    np.testing.assert_allclose(two, one, atol=1e-3)
    moved = np.linalg.norm(one - one_before)
    assert np.linalg.norm(two - one) < 1e-2 * moved


def commands(workdir, root):
    """Each `ldm-jax` command line that reads the chain's models, as two hosts."""
    wav = root / "in.wav"
    sf.write(wav, 0.3 * np.sin(np.linspace(0, 2000, 16000)).astype(np.float32), 16000)
    w = str(workdir)
    return {
        "generate": ["generate", "--workdir", w, "a slow organ melody", "a bell", "drums",
                     "--seconds", "1", "--steps", "2", "-o", str(root / "gen.wav")],
        "encode": ["codec", "encode", str(wav), "-o", str(root / "codes.npz"), "--workdir", w],
        "decode": ["codec", "decode", str(root / "codes.npz"), "-o", str(root / "dec.wav"),
                   "--workdir", w],
        "codec_eval": ["codec", "eval", "--workdir", w, "--config", "tiny", "--max-clips", "6",
                       "--json", str(root / "codec_eval.json")],
        "retrieve": ["clap", "retrieve", "--workdir", w, "--config", "tiny", "--query",
                     "an organ", "--top", "3"],
        "eval": ["eval", "generation", "--workdir", w, "--config", "tiny", "--num-prompts",
                 "4", "--steps", "2", "--no-untrained", "--json", str(root / "gen_eval.json")]
                + [f"--config.{o}" for o in OVERRIDES if o.startswith("ldm.eval")],
        "data": ["data", "build", "synthetic_music", "--data-dir", str(root / "data"),
                 "--config.data.num_train=4", "--config.data.num_test=2"],
    }


def test_commands_that_read_the_models_run_on_two_hosts(runs, tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "ldm-jax")
    for name, args in commands(runs["two"], tmp_path).items():
        out = tmp_path / name
        procs = toy.start_cluster([exe] + args, out, hosts=2)
        toy.finish(procs, out, timeout=300)
        printed = [(out / f"log{i}.txt").read_text() for i in range(2)]
        if name == "retrieve":  # process 0 prints the results
            assert " 1. " in printed[0] and " 1. " not in printed[1]
    assert sorted(p.name for p in tmp_path.glob("gen_*.wav")) == [
        "gen_000.wav", "gen_001.wav", "gen_002.wav"]
    assert (tmp_path / "dec.wav").is_file()
    assert json.loads((tmp_path / "codec_eval.json").read_text())["num_clips"] == 6
    assert json.loads((tmp_path / "gen_eval.json").read_text())["num_prompts"] == 4
    assert (tmp_path / "data" / "synthetic_music" / "1.0.0" / "dataset_info.json").is_file()
