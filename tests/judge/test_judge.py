"""The attribute judge: its contract, that it learns the labels, and `ldm-jax train judge`."""

import json

import jax
import numpy as np
import pytest

from ldm_jax import cli, loop, parallel
from ldm_jax import config as config_lib
from ldm_jax.data import builders, pipeline, synthetic
from ldm_jax.judge import JudgeConfig, JudgeError, Predictor, init_variables, load, make_model
from ldm_jax.judge import evaluate as judge_eval
from ldm_jax.judge import train as judge_train

SR = 16000
SMALL = ["model.n_mels=32", "model.widths=(16,16)", "model.groups=4", "model.dropout=0.0"]


def test_the_contract_and_its_refusals():
    model, variables = load("judge_tiny")
    clips = [np.zeros(SR // 2, np.float32), np.ones(SR, np.float32) * 0.1]
    picks = Predictor(model, variables).predict(clips)
    assert set(picks) == {"instrument", "pattern", "with_drums"}
    assert all(p in synthetic.INSTRUMENTS for p in picks["instrument"])
    assert len(picks["pattern"]) == 2
    logits = model.apply(variables, np.zeros((3, SR), np.float32))
    assert logits["instrument"].shape == (3, len(synthetic.INSTRUMENTS))
    with pytest.raises(JudgeError, match="unknown judge config keys"):
        JudgeConfig.from_dict({"widht": 3})
    with pytest.raises(JudgeError, match="multiples of model.groups"):
        JudgeConfig(widths=(12,), groups=8)
    with pytest.raises(JudgeError, match="ldm-jax train judge"):
        load("/nonexistent/dir")
    with pytest.raises(JudgeError, match="mono audio"):
        model.apply(variables, np.zeros((1, SR, 1), np.float32))
    assert make_model({"model": {"n_mels": 32}}).config.n_mels == 32
    assert init_variables(model, jax.random.key(1))["params"]["head_instrument"]["kernel"].ndim == 2


def test_the_judge_learns_the_labels():
    """Twenty steps on 48 one-second clips: the training accuracy of the instrument head moves
    from chance to well above it, and the held-out accuracy follows."""
    cfg = config_lib.get_config("judge_tiny", SMALL + [
        "data.crop_seconds=1.0", "train.batch_size=16", "train.steps=40", "train.lr=3e-3",
        "train.warmup=5"])
    examples = [synthetic.generate_example(3, i, "train", SR, 1.0) for i in range(64)]
    train, test = examples[:48], examples[48:]
    predictor = lambda state: Predictor(make_model(cfg), {"params": jax.device_get(
        parallel.host_local(state["params"]))})
    task = judge_train.make_task(
        cfg, evaluate=lambda state: {k: v for k, v in judge_eval.accuracy(
            predictor(state), test, batch_size=16).items() if isinstance(v, float)})
    iterator = pipeline.make_iterator(train, cfg.data, batch_size=16,
                                      fields=("audio", "instrument", "pattern", "with_drums"))
    result = loop.train(task, iterator, workdir=str(pytest.importorskip("tempfile").mkdtemp()),
                        num_steps=40, mesh=parallel.make_mesh(devices=jax.devices()[:1]),
                        checkpoint_cfg={"every_steps": 0}, log_cfg={"every_steps": 1,
                                                                    "progress": False})
    rows = [r for r in result.history if "train/instrument_accuracy" in r]
    first = np.mean([r["train/instrument_accuracy"] for r in rows[:3]])
    last = np.mean([r["train/instrument_accuracy"] for r in rows[-5:]])
    assert last > first + 0.3 and last > 0.6, (first, last)
    held_out = result.history[-1]["eval/instrument_accuracy"]
    assert held_out > 2 / len(synthetic.INSTRUMENTS), held_out


def test_train_judge_command_and_its_evaluation(tmp_path):
    w = tmp_path / "w"
    data = builders.build("synthetic_music", config_lib.get_config("judge_tiny", [
        "data.clip_seconds=0.5", "data.num_train=16", "data.num_test=4"]).data,
        str(w / "data"), progress=False, print_fn=None)
    assert data["splits"]["train"] == 16
    args = ["train", "judge", "--workdir", str(w), "--config.data.clip_seconds=0.5",
            "--config.data.num_train=16", "--config.data.num_test=4",
            "--config.data.crop_seconds=0.5", "--config.train.steps=2",
            "--config.train.batch_size=8", "--config.eval.batch_size=2",
            "--config.log.progress=False"] + [f"--config.{o}" for o in SMALL]
    assert cli.main(args) == 0
    saved = json.loads((w / "judge" / "judge.json").read_text())
    assert saved["widths"] == [16, 16]
    history = loop.read_history(str(w / "judge"))
    assert "eval/instrument_accuracy" in history[-1]
    predictor = Predictor.load(str(w))
    source = builders.open_split(str(w / "data"), "synthetic_music", "test")
    scores = judge_eval.accuracy(predictor, builders.Column(source, None), batch_size=2)
    assert scores["instrument_accuracy/n"] == 4
    assert scores["instrument_accuracy"] == pytest.approx(
        history[-1]["eval/instrument_accuracy"])
    # One portable file, loaded without the workdir.
    assert cli.main(["export", str(w / "judge"), "-o", str(tmp_path / "judge.msgpack")]) == 0
    model, variables = load(str(tmp_path / "judge.msgpack"))
    again = judge_eval.accuracy(Predictor(model, variables), builders.Column(source, None),
                                batch_size=2)
    assert again["instrument_accuracy"] == scores["instrument_accuracy"]
