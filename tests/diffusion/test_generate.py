"""Generation from a (random) trained chain: seeds, guidance, inpainting, variation, files,
and the generation evaluation."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import soundfile as sf

from ldm_jax import checkpoint, parallel, paths, workdir
from ldm_jax import config as config_lib
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.clap import model as clap_model
from ldm_jax.clap.text import Tokenizer
from ldm_jax.codec import inference
from ldm_jax.codec.model import CodecConfig, make_codec
from ldm_jax.data import builders
from ldm_jax.data.latents import LatentStats
from ldm_jax.diffusion import conditioning, generate
from ldm_jax.diffusion import evaluate as generation
from ldm_jax.diffusion import train as ldm_train
from ldm_jax.diffusion.schedules import DiffusionError
from ldm_jax.diffusion.unet import init_variables, make_unet

SR, LATENT, SECONDS, STEPS = 16000, 8, 0.32, 4
CAPTIONS = ["a slow organ melody in C major", "fast bell arpeggio in A minor, played loudly",
            "quiet plucked string chords", "a loud drum groove at 120 BPM"]


def random_tree(shapes, seed=0, std=0.05):
    """Random parameters from shapes alone (no initialiser is compiled)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = parallel.path_str(path).split("/")[-1]
        if name in ("scale", "alpha", "weight_g"):
            return np.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return np.zeros(leaf.shape, leaf.dtype)
        if name == "logit_scale":
            return np.asarray(math.log(1 / 0.07), leaf.dtype)
        return (rng.normal(size=leaf.shape) * std).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def write_codec(directory):
    config = CodecConfig(sample_rate=SR, channels=1, encoder_dim=4, encoder_rates=(2, 4, 4, 5),
                         latent_dim=LATENT, decoder_dim=16, decoder_rates=(5, 4, 4, 2),
                         quantizer="kl")
    x = jnp.zeros((1, config.hop_length, 1))
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(make_codec(config).init({"params": r}, x)),
                            jax.random.key(0))
    inference.write_checkpoint(str(directory), config, random_tree(shapes, std=0.5)["params"])


def write_clap(directory):
    cfg = config_lib.get_config("clap_tiny", [
        "data.sample_rate=16000", "tokenizer.vocab_size=64", "tokenizer.max_length=12",
        "model.embed_dim=16", "model.text.width=32", "model.text.num_layers=1",
        "model.text.num_heads=2", "model.audio.width=32", "model.audio.num_layers=1",
        "model.audio.num_heads=2", "model.audio.max_seconds=0.5", "model.audio.n_fft=256",
        "model.audio.hop_length=128", "model.audio.n_mels=16"])
    os.makedirs(directory)
    with open(os.path.join(directory, clap_model.CONFIG_FILE), "w") as f:
        f.write(config_lib.to_json(cfg))
    Tokenizer.train(CAPTIONS * 8, vocab_size=64).save(os.path.join(directory,
                                                                   clap_model.TOKENIZER_FILE))
    shapes = jax.eval_shape(lambda r: clap_model.init_params(cfg, r), jax.random.key(0))
    ck = Checkpointer(os.path.join(directory, "checkpoints"))
    ck.save(1, {"step": np.asarray(1, np.int32), "params": random_tree(shapes, std=0.2)})
    ck.close()


def ldm_config():
    return config_lib.get_config("ldm_tiny", [
        f"model.latent_channels={LATENT}", "model.base_channels=16", "model.channel_mult=(1,)",
        "model.attention_levels=()", "model.num_heads=2", "model.norm_groups=8",
        "model.context_dim=32", "model.pooled_dim=16", "diffusion.num_train_timesteps=100"])


def write_ldm(directory, cfg):
    stats = LatentStats(mean=np.zeros(LATENT, np.float32), std=np.ones(LATENT, np.float32),
                        scale_factor=0.5, frame_rate=100.0, sample_rate=SR, num_frames=100)
    ldm_train.save_run_files(cfg, directory, stats, "mean")
    unet = make_unet(cfg.model)
    shapes = jax.eval_shape(lambda r: init_variables(unet, r)["params"], jax.random.key(0))
    params = random_tree(shapes, seed=1, std=0.1)
    ck = Checkpointer(os.path.join(directory, "checkpoints"), model_config=cfg.model.to_dict())
    ck.save(5, {"step": np.asarray(5, np.int32), "params": params, "ema_params": params})
    ck.close()


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    w = tmp_path_factory.mktemp("w")
    write_codec(w / "codec")
    write_clap(str(w / "clap"))
    write_ldm(str(w / "ldm"), ldm_config())
    gen = generate.get_generator(str(w))
    return str(w), gen


def run(gen, prompts, **kw):
    kw = {"seconds": SECONDS, "steps": STEPS, **kw}
    return gen.generate(prompts, **kw)


def test_generation_is_deterministic_per_seed_and_independent_of_the_batch(chain):
    _, gen = chain
    assert gen.step == 5
    a, together = run(gen, CAPTIONS[:2], seed=7, return_latents=True)
    assert a.shape == (2, round(SECONDS * SR)) and a.dtype == np.float32
    assert np.all(np.isfinite(a)) and np.abs(a).max() > 0
    np.testing.assert_array_equal(run(gen, CAPTIONS[:2], seed=7), a)
    assert not np.allclose(run(gen, CAPTIONS[:2], seed=8)[0], a[0])
    # Prompt i of a call with seed s is the sample of seed s + i, whatever else is in the batch.
    _, alone = run(gen, [CAPTIONS[1]], seed=8, return_latents=True)
    np.testing.assert_allclose(alone[0], together[1], rtol=1e-4, atol=1e-4)
    # More prompts than one batch holds: every chunk gets its own prompts and noise.
    batch_size, gen.batch_size = gen.batch_size, 1
    try:
        _, chunked = run(gen, CAPTIONS[:2], seed=7, return_latents=True)
    finally:
        gen.batch_size = batch_size
    np.testing.assert_allclose(chunked, together, rtol=1e-4, atol=1e-4)


def test_guidance_scale_one_and_negative_prompt_equal_to_prompt_give_the_conditional(chain):
    _, gen = chain
    _, cond = run(gen, CAPTIONS[:2], cfg_scale=1.0, return_latents=True)
    # With the prompt itself as the negative prompt, both halves of the guided batch agree.
    same = [run(gen, [p], cfg_scale=4.0, negative_prompt=p, seed=i, return_latents=True)[1][0]
            for i, p in enumerate(CAPTIONS[:2])]
    np.testing.assert_allclose(np.stack(same), cond, rtol=1e-4, atol=1e-4)
    _, guided = run(gen, CAPTIONS[:2], cfg_scale=4.0, return_latents=True)
    assert np.abs(guided - cond).max() > 1e-2


def test_inpainting_keeps_the_latents_outside_the_range(chain):
    _, gen = chain
    t = np.arange(round(SECONDS * SR)) / SR
    clip = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    audio, latents = run(gen, CAPTIONS[:2], inpaint_audio=clip, inpaint_start=0.1,
                         inpaint_end=0.2, return_latents=True)
    known, _ = gen.encode_audio(clip, latents.shape[1])
    assert latents.shape[1] == 33  # 32 frames cover the clip, one more for the decoder
    outside = np.r_[0:10, 20:32]
    np.testing.assert_allclose(latents[:, outside], np.repeat(known, 2, 0)[:, outside],
                               rtol=1e-5, atol=1e-5)
    assert np.abs(latents[:, 10:20] - known[:, 10:20]).max() > 1e-2
    assert audio.shape == (2, clip.shape[0])


def test_audio_to_audio_starts_from_the_noised_clip(chain):
    _, gen = chain
    t = np.arange(round(SECONDS * SR)) / SR
    clip = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    known, _ = gen.encode_audio(clip, 33)
    _, light = run(gen, CAPTIONS[:1], init_audio=clip, strength=0.25, return_latents=True)
    _, free = run(gen, CAPTIONS[:1], return_latents=True)
    near = np.abs(light[0] - known[0]).mean()
    assert near < np.abs(free[0] - known[0]).mean()
    with pytest.raises(DiffusionError, match="strength"):
        run(gen, CAPTIONS[:1], init_audio=clip, strength=0.0)


def test_write_samples_and_text_to_audio(chain, tmp_path):
    w, gen = chain
    index = generate.write_samples(w, CAPTIONS[:2], seconds=SECONDS, seed=3, steps=STEPS,
                                   out_dir=str(tmp_path), progress=False)
    assert index == [{"file": "sample_000.wav", "prompt": CAPTIONS[0], "seed": 3},
                     {"file": "sample_001.wav", "prompt": CAPTIONS[1], "seed": 4}]
    assert json.load(open(tmp_path / "samples.json")) == index
    wave, rate = sf.read(tmp_path / "sample_001.wav", dtype="float32")
    assert rate == SR and wave.shape == (round(SECONDS * SR),)
    again = generate.text_to_audio(CAPTIONS[:2], workdir=w, seconds=SECONDS, steps=STEPS,
                                   seed=3)
    np.testing.assert_allclose(again[1], wave, atol=1e-4)  # a 16-bit file
    with pytest.raises(DiffusionError, match="train ldm"):
        generate.Generator(str(tmp_path))


def test_evaluation_scores_generated_against_real_clips(chain, tmp_path):
    w, gen = chain
    data = ml_collections.ConfigDict(dict(name="synthetic_music", sample_rate=SR, channels=1,
                                          clip_seconds=SECONDS, num_train=2, num_test=4,
                                          seed=0))
    builders.build("synthetic_music", data, str(tmp_path), workers=1, progress=False)
    out = tmp_path / "eval.json"
    params = gen.params
    # An attribute judge in W/judge: every group also reports judged instrument adherence.
    from ldm_jax.judge import model as judge_model
    judge, judge_vars = judge_model.load("judge_tiny")
    judge_dir = os.path.join(w, "judge")
    ck = Checkpointer(os.path.join(judge_dir, "checkpoints"), this_host_only=True)
    ck.save(1, {"step": np.asarray(1, np.int32), "params": judge_vars["params"]})
    ck.close()
    judge_model.save_config(judge_dir, judge.config)
    try:
        result = generation.evaluate_generation(w, str(tmp_path), num_prompts=2, steps=STEPS,
                                                generator=gen, out_path=str(out),
                                                progress=False)
    finally:
        paths.rmtree(judge_dir)
    for prefix in ("generated", "real", "untrained", "shuffled"):
        assert 0 <= result[f"{prefix}/judge_instrument_accuracy"] <= 1
    assert result["n_judged"] == 2
    assert gen.params is params  # the baseline borrows the generator and gives it back
    assert result["num_prompts"] == 2 and result["seconds"] == pytest.approx(SECONDS)
    assert result["fd_clap"] >= 0 and -1 <= result["clap_score"] <= 1
    assert result["untrained/fd_clap"] >= 0 and -1 <= result["untrained/clap_score"] <= 1
    for prefix in ("generated", "real", "chance", "untrained"):
        for metric in ("key_accuracy", "tempo_accuracy", "loudness_accuracy"):
            value = result[f"{prefix}/{metric}"]
            assert np.isnan(value) or 0 <= value <= 1
    assert json.load(open(out))["num_prompts"] == 2
    # MusicLDM's novelty: every generated clip against the training clips.
    assert result["novelty_clips"] >= 2 and len(result["novelty/max_similarity"]) == 2
    assert -1 <= result["novelty/mean"] <= 1 and 0 <= result["novelty/above_0.95"] <= 1
    assert "novelty_real/above_0.9" in result


def test_novelty_flags_an_exact_copy_and_not_noise():
    from ldm_jax.eval.metrics import novelty

    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 16))
    copies = novelty(train[:5] * 3.0, train)  # a copy at another level is still a copy
    np.testing.assert_allclose(copies["max_similarity"], 1.0, atol=1e-12)
    assert copies["above_0.95"] == 1.0 and copies["above_0.9"] == 1.0
    noise = novelty(rng.normal(size=(40, 16)), train)
    assert noise["above_0.9"] == 0.0 and noise["mean"] < 0.8
    mixed = novelty(np.concatenate([train[:1], rng.normal(size=(3, 16))]), train)
    assert mixed["above_0.95"] == 0.25 and set(mixed["quantiles"]) == {"5", "25", "50", "75",
                                                                         "95"}
    with pytest.raises(ValueError, match="one width"):
        novelty(train[:, :4], train)


def test_training_media_draws_the_configured_prompts(chain):
    _, gen = chain
    cfg = ldm_config()
    with cfg.unlocked():
        cfg.generation.seconds = SECONDS
        cfg.generation.media_steps = 2
    task = ldm_train.make_task(cfg, gen.clap, gen.stats, codec=gen.codec)
    media = task.media({"ema_params": gen.params})
    assert sorted(media) == ["ldm/sample_0", "ldm/sample_1"]
    kind, wave, rate = media["ldm/sample_0"]
    assert kind == "audio" and rate == SR and wave.shape == (round(SECONDS * SR),)


@pytest.mark.slow
def test_stage_trains_from_latents_and_generates(chain, tmp_path):
    """The LDM stage end to end: latents of a synthetic build, 2 steps, samples, evaluation."""
    from ldm_jax.codec import latents as codec_latents

    w, gen = chain
    data = ml_collections.ConfigDict(dict(name="synthetic_music", sample_rate=SR, channels=1,
                                          clip_seconds=SECONDS, num_train=8, num_test=2,
                                          seed=0, crop_seconds=0.16, shuffle_seed=0,
                                          worker_count=0, worker_buffer_size=1))
    builders.build("synthetic_music", data, str(tmp_path / "data"), workers=1, progress=False)
    codec_latents.encode_latents(w, data, str(tmp_path / "data"), str(tmp_path / "latents"),
                           progress=False)
    for stage in ("codec", "clap"):
        os.symlink(os.path.join(w, stage), tmp_path / stage)

    # Audio conditioning: each latent example gets its source clip's CLAP audio embedding.
    from ldm_jax.data import pipeline
    source = builders.open_split(str(tmp_path / "latents"), "latents", "train")
    cache = str(tmp_path / "ldm" / "clap_audio_train.npy")
    emb = conditioning.clip_embeddings(gen.clap, source, str(tmp_path / "latents"), cache)
    audio = builders.open_split(str(tmp_path / "data"), "synthetic_music", "train")
    clips = [audio[int(source[i]["source_index"])]["audio"] for i in range(len(source))]
    np.testing.assert_allclose(emb, gen.clap.embed_audio(clips, sample_rate=SR), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(
        conditioning.clip_embeddings(gen.clap, source, str(tmp_path / "latents"), cache), emb)
    batch = next(pipeline.make_iterator(
        conditioning.WithEmbeddings(source, emb), data, batch_size=4, crop_key="latents",
        rate=100.0, fields=("latents", "caption", "clap_audio")))
    audio_cfg = ldm_config()
    with audio_cfg.unlocked():
        audio_cfg.train.condition_on_audio = True
        audio_cfg.model.context_dim = 16
    prepared = ldm_train.Prepare(audio_cfg, gen.clap, gen.stats)(batch)
    assert prepared["latents"].shape == (4, 16, LATENT)
    assert prepared["context"].shape == (4, 1, 16)
    assert {tuple(row) for row in np.round(prepared["pooled"], 5)} <= \
        {tuple(row) for row in np.round(emb, 5)}
    # MusicLDM's mixup: a mixed row is conditioned on the CLAP embedding of the decoded mix.
    from ldm_jax.diffusion import mixup
    rhythm = {"tempo": [120.0] * len(source),
              "downbeats": [np.array([0.0, 0.08, 0.16, 0.24])] * len(source)}
    plain_prepare = ldm_train.Prepare(audio_cfg, gen.clap, gen.stats)
    mixer = mixup.Mixer(source, rhythm, plain_prepare.scale_latents, 100.0, probability=1.0,
                        tolerance=0.05, beta=5.0, seed=0)
    indexed = next(pipeline.make_iterator(
        mixup.WithIndex(conditioning.WithEmbeddings(source, emb)), data, batch_size=4,
        crop_key="latents", rate=100.0,
        fields=("latents", "caption", "clap_audio", "index")))
    mixed = ldm_train.Prepare(audio_cfg, gen.clap, gen.stats, mixer=mixer,
                              codec=gen.codec)(indexed)
    plain = plain_prepare(indexed)
    changed = np.abs(mixed["latents"] - plain["latents"]).max(axis=(1, 2)) > 1e-6
    assert changed.any()
    moved = np.abs(mixed["pooled"] - plain["pooled"]).max(axis=1) > 1e-5
    np.testing.assert_array_equal(moved, changed)
    with pytest.raises(DiffusionError, match="needs the trained codec"):
        ldm_train.Prepare(audio_cfg, gen.clap, gen.stats, mixer=mixer)
    cfg = ldm_config()
    with cfg.unlocked():
        cfg.data = data
        cfg.train.steps = 2
        cfg.train.batch_size = 8
        cfg.log.progress = False
        cfg.log.audio_every_steps = 2
        cfg.generation.seconds = SECONDS
        cfg.generation.media_steps = 2
    result = ldm_train.train(cfg, workdir.layout(cfg, str(tmp_path)))
    assert result.step == 2
    assert os.listdir(tmp_path / "logs" / "ldm")
    trained = generate.Generator(str(tmp_path), batch_size=2)
    index = generate.write_samples(str(tmp_path), CAPTIONS[:2], seconds=SECONDS, steps=2,
                                   generator=trained, progress=False)
    assert [i["file"] for i in index] == ["sample_000.wav", "sample_001.wav"]
    scores = generation.evaluate_generation(str(tmp_path), str(tmp_path / "latents"),
                                            num_prompts=2, steps=2, generator=trained,
                                            untrained=False, progress=False)
    assert scores["num_prompts"] == 2 and "untrained/fd_clap" not in scores


def test_readme_python_examples_run(chain):
    """README's Python section as written: the presets, then a trained workdir (here the tiny
    random chain, with its short length and few steps)."""
    import re

    w, _ = chain
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    section = readme[readme.index("## Python\n"):]
    presets, trained = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    ns = {}
    exec(compile(presets, "README.md", "exec"), ns)
    assert ns["z"].shape == (1, 400, 64) and ns["aux"]["codes"].shape == (1, 400, 4)
    assert ns["text"]["embedding"].shape == (1, 128) and ns["v"].shape == (1, 100, 16)
    assert np.isfinite(np.asarray(ns["v"])).all()
    code = trained.replace('"W/clap"', repr(os.path.join(w, "clap"))).replace('"W"', repr(w))
    code = code.replace("seconds=2,", f"seconds={SECONDS}, steps={STEPS},")
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["emb"].shape == (1, 16)
    assert ns["audio"].shape == (1, round(SECONDS * SR)) and np.isfinite(ns["audio"]).all()


def test_generation_options_are_checked_before_any_model_work(chain, monkeypatch):
    _, gen = chain

    def no_model_work(*args, **kwargs):
        raise AssertionError("the sampler was reached")

    monkeypatch.setattr(gen, "_sampler", no_model_work)
    monkeypatch.setattr(gen, "condition", no_model_work)
    for kwargs, what in [({"seconds": -1}, "seconds"), ({"seconds": 0}, "seconds"),
                         ({"seconds": float("nan")}, "seconds"), ({"steps": 0}, "steps"),
                         ({"steps": 2.5}, "steps"), ({"cfg_scale": float("nan")}, "cfg_scale"),
                         ({"strength": 0.0}, "strength"), ({"sampler": "heun"}, "sampler")]:
        with pytest.raises(DiffusionError, match=what):
            gen.generate(["a prompt"], **{"seconds": SECONDS, **kwargs})


def test_seconds_defaults_to_the_training_length(chain):
    w, gen = chain
    assert gen.default_seconds == 2.0  # ldm_tiny's data.crop_seconds
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gen, "default_seconds", SECONDS)
        audio = gen.generate(["a prompt"], steps=STEPS)
    assert audio.shape == (1, round(SECONDS * SR))


def test_export_writes_one_file_that_each_familys_load_reads(chain, tmp_path, capsys):
    from ldm_jax import cli
    from ldm_jax.clap import load as load_clap
    from ldm_jax.codec import load as load_codec
    from ldm_jax.diffusion import load as load_unet

    w, gen = chain
    for stage, load in (("codec", load_codec), ("clap", load_clap), ("ldm", load_unet)):
        out = str(tmp_path / f"{stage}.msgpack")
        assert cli.main(["export", os.path.join(w, stage), "-o", out]) == 0
        assert f"the {stage} of" in capsys.readouterr().out
        model, variables = load(out)
        trained_model, trained = load(w)  # the same stage read from the workdir
        assert type(model) is type(trained_model)
        same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), variables, trained)
        assert all(jax.tree_util.tree_leaves(same)) and set(variables) == set(trained)
    clap = clap_model.ClapModel.load(str(tmp_path / "clap.msgpack"), batch_size=4)
    np.testing.assert_allclose(clap.embed_text(CAPTIONS), gen.clap.embed_text(CAPTIONS),
                               rtol=1e-5, atol=1e-6)  # with its own tokenizer
    exported = checkpoint.read_export(str(tmp_path / "ldm.msgpack"))
    assert exported["provenance"]["step"] == gen.step and exported["provenance"]["ema"]
    assert "latent_stats.json" in exported["files"]
    with pytest.raises(checkpoint.CheckpointError, match="holds a ldm model, not a codec"):
        load_codec(str(tmp_path / "ldm.msgpack"))
    assert cli.main(["export", os.path.join(w, "ldm"), "-o", str(tmp_path / "x.bin")]) == 2
    assert cli.main(["export", str(tmp_path), "-o", str(tmp_path / "y.msgpack")]) == 2
    assert "not a trained stage directory" in capsys.readouterr().err


def test_controlnet_stage_trains_generates_from_controls_and_evaluates(chain, tmp_path, capsys):
    """The ControlNet end to end on the random chain: controls of a synthetic build with
    ground truth, 2 training steps, generation through the API and the CLI, the evaluation."""
    from ldm_jax import cli
    from ldm_jax.codec import latents as codec_latents
    from ldm_jax.controls import controls_from_file
    from ldm_jax.diffusion import controlnet, controlnet_train
    from ldm_jax.diffusion.config import ControlEvalConfig

    w, _ = chain
    data = ml_collections.ConfigDict(dict(name="synthetic_music", sample_rate=SR, channels=1,
                                          clip_seconds=SECONDS, num_train=8, num_test=2,
                                          seed=0, crop_seconds=0.16, shuffle_seed=0,
                                          worker_count=0, worker_buffer_size=1, controls=True))
    builders.build("synthetic_music", data, str(tmp_path / "data"), workers=1, progress=False)
    codec_latents.encode_latents(w, data, str(tmp_path / "data"), str(tmp_path / "latents"),
                                 progress=False)
    for stage in ("codec", "clap", "ldm"):
        os.symlink(os.path.join(w, stage), tmp_path / stage)
    cfg = ml_collections.ConfigDict(dict(
        model=dict(encoder_channels=(8,)), masks=dict(drop=0.3), features=dict(n_fft=512),
        train=dict(steps=2, batch_size=8), data=data.to_dict(), log=dict(progress=False),
        seed=0))
    result = controlnet_train.train(cfg, workdir.layout(cfg, str(tmp_path)))
    assert result.step == 2 and set(result.state) >= {"base", "params", "opt_state"}
    loaded = controlnet.load_trained(str(tmp_path))
    model, variables = controlnet.load(str(tmp_path))
    assert model.controls == loaded.controls and jax.tree_util.tree_structure(
        variables["params"]) == jax.tree_util.tree_structure(loaded.params)
    assert loaded.controls == ("melody", "dynamics", "rhythm") and loaded.step == 2
    assert loaded.features.frame_rate == 100.0 and loaded.features.n_fft == 512

    gen = generate.Generator(str(tmp_path), batch_size=2)
    ref = tmp_path / "ref.wav"
    clip = builders.open_split(str(tmp_path / "data"), "synthetic_music", "test")[0]["audio"]
    sf.write(ref, np.asarray(clip).reshape(-1), SR)
    found = controls_from_file(ref, frame_rate=100.0)
    plain = run(gen, CAPTIONS[:2])
    scaled0 = run(gen, CAPTIONS[:2], controls={"melody": found}, control_scale=0.0)
    np.testing.assert_allclose(scaled0, plain, rtol=1e-4, atol=1e-5)
    given = run(gen, CAPTIONS[:2], controls={"melody": found, "rhythm": found},
                control_ranges={"melody": (0.0, 0.16)})
    assert given.shape == plain.shape and np.abs(given - plain).max() > 0
    assert generate.text_to_audio(CAPTIONS[0], workdir=str(tmp_path), seconds=None, steps=2,
                                  controls={"dynamics": found}).shape == (1, len(clip))

    out = tmp_path / "out.wav"
    base = ["generate", "--workdir", str(tmp_path), "a calm melody", "--steps", "2",
            "-o", str(out)]
    assert cli.main(base + ["--melody-from", str(ref), "--control-end", "0.2"]) == 0
    assert sf.info(out).duration == pytest.approx(SECONDS, abs=0.01)
    capsys.readouterr()
    csv = tmp_path / "curve.csv"
    csv.write_text("time,db\n0,-20\n0.1,-10\n")
    for extra, message in ((["--melody-from", str(tmp_path / "none.wav")], "no such file"),
                           (["--dynamics-curve", str(csv), "--seconds", str(SECONDS)],
                            "covers 0.10 s but is asked for up to"),
                           (["--rhythm-from", str(csv)], "gives no rhythm"),
                           (["--control-scale", "2"], "need a control")):
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    settings = ControlEvalConfig(num_prompts=2, steps=2, batch_size=2, bootstrap=10,
                                 fd_bootstrap=10)
    source = builders.open_split(str(tmp_path / "data"), "synthetic_music", "test")
    scores = generation.evaluate_controls(str(tmp_path), source, settings, generator=gen,
                                          ceiling={"codec/beat_f1": 0.5}, progress=False)
    assert scores["num_clips"] == 2 and scores["controls"] == ["melody", "dynamics", "rhythm"]
    for label in ("none", "melody", "dynamics", "rhythm", "all", "first_half",
                  "first_half/first_half", "first_half/second_half"):
        assert f"{label}/beat_f1" in scores and len(scores[f"{label}/beat_f1/ci95"]) == 2
    assert np.isfinite(scores["all/fd_clap"]) and len(scores["none/fd_clap/ci95"]) == 2
    assert 0 < scores["p_value/all_vs_none/beat_f1"] <= 1
    assert "all/beat_f1/share_of_ceiling" in scores and "ceiling/melody_accuracy" not in scores


def test_paired_p_value_and_frechet_interval():
    rng = np.random.default_rng(0)
    a = rng.normal(size=64)
    assert generation.paired_p_value(a + 1.0, a, n=2000) < 0.001
    assert generation.paired_p_value(a, a + 1.0, n=2000) > 0.99
    assert generation.paired_p_value(a, a, n=100) == 1.0  # no difference: never above
    emb = rng.normal(size=(64, 4))
    low, high = generation.frechet_interval(emb, emb + 0.5, n=50)
    assert low < generation.frechet_distance(emb, emb + 0.5) * 1.5 and low <= high


def test_ditto_reaches_the_noise_through_the_codec_and_runs_from_api_and_cli(chain, tmp_path,
                                                                           capsys):
    """DITTO on the random chain: the gradient of an audio loss reaches x_T through the U-Net
    and the codec decoder (it matches finite differences); every task runs from `ditto(...)`;
    the command writes the audio and the loss trajectory and refuses bad input in one line."""
    from ldm_jax import cli
    from ldm_jax.controls import controls_from_file
    from ldm_jax.diffusion import ditto

    w, gen = chain
    runner = ditto.Ditto(gen)
    frames, samples, feature_frames = runner.frames(SECONDS)
    term = ditto.fit_frames(ditto.intensity(np.linspace(-40, -20, feature_frames)),
                            feature_frames, frames)
    objective = ditto._objective(runner.problem(samples, True), [term],
                                 ditto.DittoConfig(), 3, "ddim", True)
    cond = gen.condition(CAPTIONS[:1])
    context = {"cond": cond, "uncond": gen.unconditional(cond), "scale": np.float32(3.0)}

    def loss(x):
        return jnp.sum(objective(gen.params, gen.codec.variables, x, context,
                                 [dict(term.arrays)])[0])

    x = jnp.asarray(gen.initial_noise([0], frames))
    grad = jax.jit(jax.grad(loss))(x)
    assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0
    direction = np.random.default_rng(1).standard_normal(x.shape)
    direction = jnp.asarray(direction / np.linalg.norm(direction), jnp.float32)
    # The random decoder's dB curves carry float32 noise of about 1 in 4600: a wide step.
    eps = 0.1
    numeric = (loss(x + eps * direction) - loss(x - eps * direction)) / (2 * eps)
    assert float(numeric) == pytest.approx(float(jnp.sum(grad * direction)), rel=0.1)

    config = ditto.DittoConfig(iterations=3, sampler_steps=2)
    csv = tmp_path / "curve.csv"
    csv.write_text("time,db\n0,-40\n0.3,-20\n")
    curve = controls_from_file(csv, frame_rate=100.0)
    result = ditto.ditto(CAPTIONS[:2], workdir=w, seconds=SECONDS, generator=gen,
                         controls={"dynamics": curve}, control_ranges={"dynamics": (0.1, None)},
                         structure_pattern="ABA", loop_seconds=0.08, config=config,
                         weights={"structure": 2.0})
    assert result["history"].shape == (4, 2) and result["audio"].shape == (2, samples)
    assert set(result["terms"]) == {"intensity", "structure", "loop"}
    assert result["output"].shape == (2, (frames - 8) * SR // 100)  # one period of the loop
    again = ditto.ditto(CAPTIONS[:2], workdir=w, seconds=SECONDS, generator=gen,
                        controls={"dynamics": curve}, control_ranges={"dynamics": (0.1, None)},
                        structure_pattern="ABA", loop_seconds=0.08, config=config,
                        weights={"structure": 2.0})
    np.testing.assert_array_equal(result["x_T"], again["x_T"])  # deterministic per seed
    reference = np.sin(np.arange(int(0.5 * SR)) / SR * 2 * np.pi * 330).astype(np.float32)
    out = ditto.ditto(CAPTIONS[0], workdir=w, seconds=SECONDS, generator=gen, config=config,
                      outpaint_audio=reference, outpaint_seconds=0.1)
    assert out["output"].shape == (1, int(round((0.5 - 0.1 + SECONDS) * SR)))
    inpainted = ditto.ditto(CAPTIONS[0], workdir=w, seconds=SECONDS, generator=gen,
                            config=config, inpaint_audio=reference[:samples], inpaint_start=0.1,
                            inpaint_end=0.2)
    assert inpainted["output"].shape == (1, samples)

    ref = tmp_path / "ref.wav"
    sf.write(ref, reference, SR)
    wav, trajectory = tmp_path / "d.wav", tmp_path / "d.json"
    base = ["ditto", "--workdir", w, "a calm melody", "--seconds", str(SECONDS),
            "--iterations", "2", "--sampler-steps", "2", "-o", str(wav)]
    assert cli.main(base + ["--dynamics-from", str(ref), "--melody-from", str(ref),
                            "--json", str(trajectory)]) == 0
    record = json.loads(trajectory.read_text())
    assert len(record["loss"][0]) == 3 and set(record["terms"]) == {"intensity", "melody"}
    assert sf.info(wav).duration == pytest.approx(SECONDS, abs=0.01)
    capsys.readouterr()
    for extra, message in (([], "nothing to optimise toward"),
                           (["--loop", "--weight", "loop=-1"], "--weight 'loop=-1'"),
                           (["--structure", "A"], "section letters"),
                           (["--outpaint", str(tmp_path / "none.wav")], "no such file"),
                           (["--loop", "--inpaint-start", "0.1"], "need --inpaint"),
                           (["--loop", "--loop-seconds", "0.2"], "needs a clip of more")):
        assert cli.main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_long_form_generates_window_by_window(chain):
    """Beyond the window, clips are made window by window: the first window is plain
    sampling's clip of that length, each later one keeps its overlap exactly; DITTO
    outpainting runs too; long-form with another input is refused."""
    from ldm_jax.diffusion import ditto

    _, gen = chain
    window, overlap, seconds = 0.16, 0.04, 0.5
    plan = gen.long_form_plan(seconds, "window", window, overlap)
    assert plan["windows"] == 4 and plan["overlap_frames"] == 4 and plan["window_frames"] == 17
    assert plan["boundaries"] == pytest.approx([0.17, 0.30, 0.43])
    assert gen.long_form_plan(0.1, "window", window, overlap) is None
    audio, latents = run(gen, CAPTIONS[:2], seconds=seconds, long_form="window",
                         window_seconds=window, overlap_seconds=overlap, return_latents=True)
    assert audio.shape == (2, int(seconds * SR)) and latents.shape[1] == gen.frames_for(seconds)
    _, first = run(gen, CAPTIONS[:2], seconds=(17 - 1) / 100, return_latents=True)
    np.testing.assert_allclose(latents[:, :17], first, rtol=1e-4, atol=1e-5)
    whole = run(gen, CAPTIONS[:2], seconds=seconds, long_form="none")
    assert np.abs(whole - audio).max() > 0
    optimised = run(gen, CAPTIONS[:1], seconds=0.3, long_form="ditto", window_seconds=window,
                    overlap_seconds=overlap,
                    ditto_config=ditto.DittoConfig(iterations=2, sampler_steps=2))
    assert optimised.shape == (1, int(0.3 * SR))
    with pytest.raises(DiffusionError, match="takes text alone"):
        run(gen, CAPTIONS[:1], seconds=seconds, long_form="window", init_audio=audio[0])
    with pytest.raises(DiffusionError, match="overlap_seconds"):
        gen.long_form_plan(seconds, "window", window, 0.2)
    with pytest.raises(DiffusionError, match="long_form="):
        gen.long_form_plan(seconds, "sliding")


def test_ditto_evaluation_scores_every_task_and_the_long_form(chain, tmp_path):
    from ldm_jax.diffusion import ditto
    from ldm_jax.diffusion.config import DittoEvalConfig

    w, gen = chain
    data = ml_collections.ConfigDict(dict(name="synthetic_music", sample_rate=SR, channels=1,
                                          clip_seconds=SECONDS, num_train=2, num_test=2,
                                          seed=0, shuffle_seed=0, worker_count=0,
                                          worker_buffer_size=1))
    builders.build("synthetic_music", data, str(tmp_path / "data"), workers=1, progress=False)
    source = builders.open_split(str(tmp_path / "data"), "synthetic_music", "test")
    settings = DittoEvalConfig(num_clips=2, seconds=0.3, batch_size=2, loop_seconds=0.05,
                               bootstrap=10, fd_bootstrap=10, long_seconds=0.5, long_clips=2,
                               long_steps=2, long_window_seconds=0.3, long_forms=("window",
                                                                                  "ditto"))
    scores = generation.evaluate_ditto(
        w, source, settings, ditto.DittoConfig(iterations=2, sampler_steps=2), generator=gen,
        progress=False)
    assert scores["num_clips"] == 2 and not scores["controlnet"]
    for key in ("intensity/ditto/mse_db2", "melody/ditto/accuracy", "structure/ditto/ssm_mse",
                "loop/ditto/mismatch", "loop/plain/seam_hard", "outpaint/ditto/region_over_codec",
                "outpaint/plain/codec_mel_distance", "intensity/ditto/fd_over_plain",
                "p_value/intensity/ditto_vs_plain/mse_db2", "melody/seconds_per_clip",
                "long/window/seam", "long/window/seam_rank", "long/ditto/seam"):
        assert key in scores and np.isfinite(scores[key]), key
    assert scores["intensity/ditto/mse_db2/n"] == 2 and scores["long/windows"] == 2
    assert scores["intensity/ditto/mse_db2"] <= scores["intensity/plain/mse_db2"]
