"""CLAP training: caption augmentation, batch preparation, and a smoke run through loop.train
(two steps, save, restore, one more step) on an in-memory dataset."""

import jax
import numpy as np
import pytest

from ldm_jax import loop, parallel
from ldm_jax.clap import model as clap_model
from ldm_jax.clap import train as clap_train
from ldm_jax.clap.text import Tokenizer
from ldm_jax.data import pipeline, synthetic

RATE, SECONDS = 8000, 0.5


@pytest.fixture(scope="module")
def records():
    out = []
    for i in range(8):
        ex = synthetic.generate_example(0, i, "train", sample_rate=RATE, seconds=SECONDS)
        out.append({k: ex[k] for k in ("audio", "caption", "instrument", "key", "mode", "pattern",
                                       "loudness", "tempo_bpm")} | {"id": f"train_{i}"})
    return out


@pytest.fixture(scope="module")
def tokenizer(records):
    captions = [r["caption"] for r in records]
    captions += [clap_train.paraphrase(r, np.random.default_rng(i), 0.3)
                 for i, r in enumerate(records)]
    return Tokenizer.train(captions, vocab_size=96)


def test_caption_augmentation_is_deterministic_and_keeps_the_subject(records):
    caption = "Upbeat organ melody in D major, played softly, 128 BPM."
    assert clap_train.drop_clauses(caption, np.random.default_rng(0), 1.0) == \
        "Upbeat organ melody in D major."
    assert clap_train.drop_clauses(caption, np.random.default_rng(0), 0.0) == caption
    attrs = dict(instrument="plucked_string", key="D", mode="minor", pattern="melody",
                 loudness="quiet", tempo_bpm=80.0)
    kept = clap_train.paraphrase(attrs, np.random.default_rng(1), 0.0)
    assert "in D minor" in kept and any(w in kept for w in synthetic.TEMPO_WORDS["slow"])
    assert any(w in kept for w in synthetic.INSTRUMENT_WORDS["plucked_string"])
    bare = clap_train.paraphrase(attrs, np.random.default_rng(1), 1.0)
    assert "minor" not in bare and any(w in bare
                                       for w in synthetic.INSTRUMENT_WORDS["plucked_string"])


def test_prepare_gives_mono_audio_masks_and_tokens(records, tokenizer, clap_test_config):
    cfg = clap_test_config()
    prepare = clap_train.Prepare(cfg, tokenizer)
    batch = next(pipeline.make_iterator(records, cfg.data, batch_size=4, seed=0,
                                        fields=clap_train.read_fields(records),
                                        process_index=0, process_count=1))
    assert batch["audio"].ndim == 3  # [B, T, C] from the pipeline
    out = prepare(batch)
    assert set(out) == {"audio", "audio_mask", "tokens", "text_mask"}
    assert out["audio"].shape == (4, int(0.4 * RATE)) and out["audio_mask"].all()
    assert out["tokens"].shape == (4, 16) and out["tokens"].dtype == np.int32
    again = prepare(batch)
    np.testing.assert_array_equal(out["tokens"], again["tokens"])
    plain = clap_train.Prepare(cfg, tokenizer, train=False)(batch)
    expected, _ = tokenizer.encode(list(batch["caption"]), 16)
    np.testing.assert_array_equal(plain["tokens"], expected)
    no_mask = prepare({"audio": batch["audio"][..., 0], "caption": batch["caption"],
                       "audio_length": np.array([100, 3200, 5, 7])})
    assert no_mask["audio_mask"].sum(1).tolist() == [100, 3200, 5, 7]
    with pytest.raises(clap_model.ClapError, match="needs audio and caption"):
        prepare({"audio": batch["audio"]})


def test_two_steps_save_restore_step_again(records, tokenizer, tmp_path, clap_test_config):
    cfg = clap_test_config()
    workdir = str(tmp_path / "clap")
    mesh = parallel.make_mesh(cfg.mesh)
    task = clap_train.make_task(cfg, tokenizer)  # one Task: the resumed run reuses its compile

    def run(steps):
        it = pipeline.make_iterator(records, cfg.data, batch_size=8, seed=0,
                                    fields=clap_train.read_fields(records), process_index=0,
                                    process_count=1)
        return loop.train(task, it, workdir=workdir, num_steps=steps, mesh=mesh,
                          checkpoint_cfg=cfg.checkpoint, log_cfg=cfg.log)

    first = run(2)
    assert first.step == 2 and [r["step"] for r in first.history] == [1, 2]
    assert all(np.isfinite(r["train/loss"]) for r in first.history)
    assert first.history[0]["train/temperature"] == pytest.approx(0.07, rel=1e-3)
    resumed = run(3)
    assert resumed.step == 3 and [r["step"] for r in resumed.history] == [3]
    assert np.isfinite(resumed.history[0]["train/loss"])
    scale = float(jax.device_get(resumed.state["params"]["logit_scale"]))
    assert abs(scale - np.log(1 / 0.07)) > 1e-5  # the temperature is learned
    query = resumed.state["params"]["text"]["transformer"]["block_0"]["attn"]["query"]["kernel"]
    assert len(query.sharding.device_set) == 8
