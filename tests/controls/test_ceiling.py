"""Scoring clips against their stored controls, and `ldm-jax eval controls --ceiling` on a
controls_tiny workdir with a small random codec."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import chain, cli, controls, paths
from ldm_jax import config as config_lib
from ldm_jax.codec import CodecConfig, inference, make_model
from ldm_jax.controls import evaluate as control_eval
from ldm_jax.data import builders, synthetic

SR, SECONDS = 16000, 4.0
CFG = controls.FeatureConfig(sample_rate=SR, frame_rate=50)


@pytest.fixture(scope="module")
def examples():
    return [synthetic.generate_example(1, i, "test", SR, SECONDS, controls=True)
            for i in range(6)]


def test_identity_truth_scores_one_and_a_bad_copy_scores_less(examples):
    ex = examples[0]
    frames = CFG.num_frames(len(ex["audio"]))
    truth = control_eval.ground_truth(ex, frames, CFG.frame_rate)
    assert truth["pitch_class"].shape == (frames,) and truth["dynamics_db"].shape == (frames,)
    real = control_eval.score_clips(examples, CFG, batch_size=4)
    assert real["num_clips"] == 6 and real["beat_f1"]["n"] == 6
    assert real["dynamics_correlation"]["mean"] > 0.5
    low, high = real["beat_f1"]["ci95"]
    assert low <= real["beat_f1"]["mean"] <= high
    # Reversed in time, nothing lines up with the truth any more.
    flipped = control_eval.score_clips(examples, CFG, transform=lambda x: x[:, ::-1],
                                       batch_size=4)
    assert flipped["dynamics_correlation"]["mean"] < real["dynamics_correlation"]["mean"]
    assert flipped["beat_f1"]["mean"] <= real["beat_f1"]["mean"]
    with pytest.raises(controls.ControlsError, match="data.controls=True"):
        control_eval.ground_truth({"audio": ex["audio"]}, frames, 50.0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A controls_tiny workdir with 3 test clips of 4 s and a random KL codec at hop 320."""
    w = tmp_path_factory.mktemp("controls_tiny")
    cfg = config_lib.get_config("controls_tiny", [
        "data.clip_seconds=4.0", "data.num_train=1", "data.num_test=3"])
    builders.build(cfg.data.name, cfg.data, chain.data_dir(cfg, str(w)), progress=False,
                   print_fn=None)
    config = CodecConfig(sample_rate=SR, channels=1, encoder_dim=4, encoder_rates=(2, 4, 5, 8),
                         latent_dim=4, decoder_dim=16, decoder_rates=(8, 5, 4, 2), quantizer="kl")
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(make_model(config).init(
        {"params": r}, jnp.zeros((1, config.hop_length, 1)))), jax.random.key(0))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: (rng.normal(size=s.shape) * 0.3).astype(s.dtype), shapes)["params"]
    inference.write_checkpoint(str(w / "codec"), config, params, step=cfg.codec.train.steps)
    return cfg, w


def test_the_ceiling_command_scores_real_and_reconstructed_clips(workdir, capsys):
    cfg, w = workdir
    out = w / "controls.json"
    assert cli.main(["eval", "controls", "--ceiling", "--workdir", str(w), "--json", str(out),
                     "--config.data.clip_seconds=4.0", "--config.data.num_train=1",
                     "--config.data.num_test=3"]) == 0
    got = json.loads(out.read_text())
    assert got["num_clips"] == 3 and got["frame_rate"] == 50.0
    for source in ("real", "codec"):
        for metric in control_eval.METRICS:
            assert f"{source}/{metric}" in got and f"{source}/{metric}/ci95" in got
    assert got["real/beat_f1/n"] == 3
    assert got["real/dynamics_correlation"] > got["codec/dynamics_correlation"]
    assert got["provenance"]["seeds"]["bootstrap_seed"] == 0
    # The chain's stage writes the same scores.
    stage = chain.registry()["controls_eval"]
    summary = stage.run(cfg, str(w))
    record = json.loads(paths.read_text(str(w / "codec" / "controls.json")))
    assert summary["real/beat_f1"] == record["real/beat_f1"] == got["real/beat_f1"]
    capsys.readouterr()
    assert cli.main(["eval", "controls", "--workdir", str(w)]) == 2
    err = capsys.readouterr().err
    assert "no trained ControlNet" in err and "--ceiling" in err and err.count("\n") == 1
    assert cli.main(["eval", "controls", "--ceiling", "--workdir", str(w), "--config",
                     "tiny"]) == 2
    assert "controls_tiny" in capsys.readouterr().err


def test_the_judge_stage_and_its_evaluation_on_real_and_reconstructed_clips(workdir):
    cfg, w = workdir
    small = ["data.clip_seconds=4.0", "data.num_train=1", "data.num_test=3",
             "judge.train.steps=1", "judge.train.batch_size=8", "judge.data.crop_seconds=1.0",
             "judge.model.widths=(8,8)", "judge.model.n_mels=16", "judge.model.groups=4",
             "judge.eval.batch_size=2", "judge.log.progress=False"]
    assert cli.main(["train", "judge", "--config", "controls_tiny", "--workdir", str(w)]
                    + [f"--config.{o}" for o in small]) == 0
    cfg = config_lib.get_config("controls_tiny", small)
    summary = chain.registry()["judge_eval"].run(cfg, str(w))
    record = json.loads(paths.read_text(str(w / "judge" / "eval.json")))
    for source in ("real", "codec"):
        assert 0 <= record[f"{source}/instrument_accuracy"] <= 1
        assert record[f"{source}/instrument_accuracy/n"] == 3
    assert summary["real/instrument_accuracy"] == record["real/instrument_accuracy"]
    assert record["provenance"]["seeds"]["bootstrap_seed"] == 0
