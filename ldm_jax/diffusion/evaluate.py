"""Evaluation of text-to-audio generation: Fréchet distance, CLAP score, prompt adherence.

- Fréchet distance between Gaussians fitted to CLAP audio embeddings of real and generated clips,
  and the CLAP score of each generated clip against its prompt (`eval.metrics`), with the same
  score on the real clips of the prompts as a reference.
- The same scores for the U-Net at initialisation (`untrained/...`), sampled with the same noise
  and decoded by the same codec: what training has to improve on.
- Prompt adherence by signal analysis that shares nothing with the models (`eval.music`): key,
  mode, tempo and loudness class of each generated clip against the attributes of the test example
  its prompt was taken from; the same analysis of the real test clips gives the analyser's own
  accuracy (the ceiling a perfect generator would reach), and the attribute distribution gives the
  chance level. Scoring the generated clips against permuted references (`shuffled/...`, with
  permutation p-values under `p_value/...`) keeps any bias of the generator or the analyser
  towards one class and removes only the prompt: adherence is what exceeds it.

On several hosts every host calls `evaluate_generation`: the prompts are shared among the hosts
in whole batches (generated, embedded and analysed where they were generated) and only the
embeddings and analyses are gathered, so the scores equal a single host's.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from ldm_jax import parallel, paths, provenance
from ldm_jax.diffusion.schedules import DiffusionError
from ldm_jax.eval import music
from ldm_jax.eval.metrics import clap_score, frechet_distance, novelty

ATTRIBUTES = ("key", "mode", "tempo_bpm", "loudness", "loudness_db", "instrument", "pattern")


def _string(v):
    return v.decode() if isinstance(v, bytes) else v


def load_prompts(data_dir: str, *, num_prompts: int, split: str = "test",
                 dataset: str | None = None, decode=None) -> dict:
    """Prompts, ground-truth attributes and real clips of the first examples of a split.

    Args:
      data_dir: a latents directory (W/latents) or a TFDS data directory holding an audio dataset
        (`synthetic_music`, `audio_folder`).
      num_prompts: how many examples.
      split: which split.
      dataset: the dataset name; None finds `latents`, then any builder's dataset in DATA_DIR.
      decode: `latents [T, D] -> audio [T']`, used for real clips when a latents dataset's
        source audio is not available.

    Returns:
      {"prompts": [str], "references": [attribute dicts], "audio": [np.ndarray [T]],
       "sample_rate": int}.
    """
    from ldm_jax.data import builders, latents

    names = [dataset] if dataset else ["latents", *builders.BUILDERS]
    for name in names:
        try:
            builders.dataset_info(data_dir, name)
        except builders.DataError:
            continue
        break
    else:
        raise builders.DataError(f"no latents or audio dataset in {data_dir}; pass the latents "
                                 "directory (W/latents) or the data directory (W/data)")
    source = builders.open_split(data_dir, name, split)
    n = min(int(num_prompts), len(source))
    if n < 2:
        raise builders.DataError(f"{name}/{split} in {data_dir} has {len(source)} examples; the "
                                 "evaluation needs at least 2")
    examples = [source[i] for i in range(n)]
    rate = int(builders.dataset_info(data_dir, name)["params"].get("sample_rate", 0))
    if name == "latents":
        meta = latents.read_metadata(data_dir)
        audio_dir, audio_name = meta.get("data_dir", ""), meta.get("source", "")
        try:
            audio_source = builders.open_split(audio_dir, audio_name, split)
            rate = int(builders.dataset_info(audio_dir, audio_name)["params"]["sample_rate"])
            clips = [audio_source[int(e["source_index"])]["audio"] for e in examples]
        except (builders.DataError, OSError, KeyError):
            if decode is None:
                raise
            clips, rate = [decode(e["latents"]) for e in examples], int(meta["sample_rate"])
    else:
        clips = [e["audio"] for e in examples]
    references = [{k: _string(e[k]) for k in ATTRIBUTES if k in e} for e in examples]
    return {"prompts": [_string(e["caption"]) for e in examples], "references": references,
            "audio": [np.asarray(c, np.float32) for c in clips], "sample_rate": rate}


def _mono(audio):
    return [a if a.ndim == 1 else a.mean(-1) for a in audio]


def _embed_and_analyse(gen, clips, n: int, sample_rate: int, desc: str, judge=None
                       ) -> tuple[np.ndarray, list[dict]]:
    """CLAP audio embeddings [n, E] and `music.analyse` results of the clips `clips(rows)`
    ([T] each), in batches of the generator's size shared among the hosts; with a `judge`
    (`ldm_jax.judge.Predictor`), each analysis also holds its instrument (`judge_instrument`)."""
    def batch(rows: range):
        audio = _mono(clips(rows))
        analyses = [music.analyse(c, sample_rate) for c in audio]
        if judge is not None:
            if judge.sample_rate != sample_rate:
                raise ValueError(f"the judge hears {judge.sample_rate} Hz audio, the clips are "
                                 f"{sample_rate} Hz")
            for a, pick in zip(analyses, judge.predict(audio)["instrument"]):
                a["judge_instrument"] = pick
        return gen.clap.embed_audio(audio, sample_rate=sample_rate), analyses

    batches = parallel.map_batches(batch, n, gen.batch_size, desc=desc)
    return (np.concatenate([emb for emb, _ in batches]),
            [a for _, analyses in batches for a in analyses])


def _generated_scores(gen, params, prompts, references, real_emb, text_emb, settings,
                      desc: str, judge=None) -> dict:
    """Generates with U-Net `params` and scores the clips: fd_clap, clap_score, adherence
    (accuracies and the counts `n_...`) and, under `analyses`, the clips' analyses."""
    settings = dict(settings)
    seed, progress = int(settings.pop("seed")), settings.pop("progress")

    def generated(rows: range):
        return gen.generate([prompts[i] for i in rows], seed=[seed + i for i in rows],
                            **settings)

    trained = gen.params
    gen.params = params
    try:
        emb, analyses = _embed_and_analyse(gen, generated, len(prompts), gen.sample_rate,
                                           desc if progress else None, judge)
    finally:
        gen.params = trained
    return {"fd_clap": frechet_distance(real_emb, emb), "clap_score": clap_score(emb, text_emb),
            **music.adherence(analyses, references), "analyses": analyses, "embeddings": emb}


def _embeddings(gen, clips: list, sample_rate: int) -> np.ndarray:
    """CLAP audio embeddings [N, E] of CLIPS, in batches shared among the hosts."""
    def batch(rows: range):
        return gen.clap.embed_audio(_mono([clips[i] for i in rows]), sample_rate=sample_rate)
    return np.concatenate(parallel.map_batches(batch, len(clips), gen.batch_size))


def _novelty_scores(prefix: str, found: dict) -> dict:
    out = {f"{prefix}/mean": found["mean"], f"{prefix}/quantiles": found["quantiles"],
           f"{prefix}/max_similarity": found["max_similarity"]}
    out.update({f"{prefix}/{k}": v for k, v in found.items() if k.startswith("above_")})
    return out


def _judge(workdir: str):
    """The attribute judge trained in W/judge, or None where the chain has none."""
    from ldm_jax.judge import Predictor
    from ldm_jax.judge.model import CONFIG_FILE
    stage = os.path.join(workdir, "judge")
    if not paths.isfile(os.path.join(stage, CONFIG_FILE)):
        return None
    return Predictor.load(stage)


def _initial_params(gen, seed: int):
    """The U-Net's parameters at initialisation, as training starts from them."""
    import jax

    from ldm_jax.diffusion.unet import init_variables

    return jax.jit(lambda rng: init_variables(gen.unet, rng)["params"])(jax.random.key(int(seed)))


def evaluate_generation(workdir: str, data_dir_or_latents: str, *, num_prompts: int = 32,
                        seconds: float | None = None, steps: int = 50,
                        sampler: str = "dpmpp_2m", cfg_scale: float = 3.0, seed: int = 0,
                        batch_size: int = 8, split: str = "test", generator=None,
                        untrained: bool = True, out_path: str | None = None,
                        progress: bool = True, novelty_clips: int = 512) -> dict:
    """Generates audio for test prompts and scores it.

    Args:
      workdir: W with trained codec (W/codec), CLAP (W/clap) and LDM (W/ldm).
      data_dir_or_latents: the latents directory (W/latents) or the audio data directory
        (W/data); prompts and attributes come from its `split`.
      num_prompts: prompts evaluated (the first examples of the split).
      seconds: generated length; None uses the real clips' length.
      steps, sampler, cfg_scale, seed: sampling settings (prompt i uses seed + i).
      batch_size: prompts generated together.
      split: which split's prompts.
      generator: a `generate.Generator` to reuse (default: loaded from W).
      untrained: also score the U-Net at initialisation (seeded with `seed`) as a baseline.
      out_path: also write the result there as JSON (e.g. W/samples/eval.json).
      progress: show progress bars (on process 0).
      novelty_clips: training clips (the first of the train split) that MusicLDM's novelty
        measure compares every generated clip with; 0 skips it.

    Returns:
      Flat dict, the same on every host: settings; `fd_clap` (real vs generated CLAP audio
      embeddings), `clap_score`, `clap_score_real`; for generated clips (`generated/...`),
      real clips (`real/...`) and chance (`chance/...`): key_accuracy, mode_accuracy,
      key_mode_accuracy, tempo_accuracy (within 8%), tempo_octave_accuracy (also at half or
      double tempo), loudness_accuracy; and the counts of scored prompts; the generated clips
      against permuted references (`shuffled/...`, 1000 permutations) and the permutation
      p-value of the true pairing (`p_value/...`, see `music.shuffled`); with `untrained`,
      `untrained/fd_clap`, `untrained/clap_score` and the untrained model's adherence
      (`untrained/key_accuracy`...). Where W holds a trained attribute judge (W/judge), every
      group also has `judge_instrument_accuracy`: instrument adherence judged independently
      of CLAP. `novelty/...`: each generated clip's highest CLAP audio-audio cosine
      similarity to a training clip (`max_similarity` per clip, its `mean` and `quantiles`, and
      the share `above_0.9` and `above_0.95`; an exact copy scores 1), with the same for the
      real test clips under `novelty_real/...` as the reference of clips never trained on.
    """
    from ldm_jax.diffusion import generate

    gen = generator or generate.Generator(workdir, batch_size=batch_size)
    judge = _judge(workdir)
    data = load_prompts(data_dir_or_latents, num_prompts=num_prompts, split=split,
                        decode=gen.decode_latents)
    prompts, references, real = data["prompts"], data["references"], data["audio"]
    real_rate = data["sample_rate"]
    if seconds is None:
        seconds = float(np.median([len(c) for c in real])) / real_rate
    settings = dict(seconds=seconds, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                    seed=seed, progress=progress)
    real_emb, real_analyses = _embed_and_analyse(
        gen, lambda rows: [real[i] for i in rows], len(real), real_rate,
        "analyse real" if progress else None, judge)
    text_emb = gen.clap.embed_text(prompts)
    score = functools.partial(_generated_scores, gen, prompts=prompts, references=references,
                              real_emb=real_emb, text_emb=text_emb, settings=settings,
                              judge=judge)
    generated = score(gen.params, desc="analyse generated")
    generated_emb = generated.pop("embeddings")
    shuffled, p_values = music.shuffled(generated.pop("analyses"), references, seed=seed)
    result = {"num_prompts": len(prompts), "seconds": float(seconds), "steps": int(steps),
              "sampler": sampler, "cfg_scale": float(cfg_scale),
              "fd_clap": generated.pop("fd_clap"), "clap_score": generated.pop("clap_score"),
              "clap_score_real": clap_score(real_emb, text_emb)}
    ceiling = music.adherence(real_analyses, references)
    for k, v in generated.items():
        result[f"generated/{k}" if not k.startswith("n_") else k] = v
    result.update({f"real/{k}": v for k, v in ceiling.items() if not k.startswith("n_")})
    result.update({f"chance/{k}": v for k, v in music.chance(references).items()})
    result.update({f"shuffled/{k}": v for k, v in shuffled.items()})
    result.update({f"p_value/{k}": v for k, v in p_values.items()})
    if novelty_clips:
        train = load_prompts(data_dir_or_latents, num_prompts=novelty_clips, split="train",
                             decode=gen.decode_latents)
        train_emb = _embeddings(gen, train["audio"], train["sample_rate"])
        result["novelty_clips"] = len(train_emb)
        result.update(_novelty_scores("novelty", novelty(generated_emb, train_emb)))
        result.update(_novelty_scores("novelty_real", novelty(real_emb, train_emb)))
    if untrained:
        baseline = score(_initial_params(gen, seed), desc="analyse untrained")
        baseline.pop("analyses")
        baseline.pop("embeddings")
        result.update({f"untrained/{k}": v for k, v in baseline.items()
                       if not k.startswith("n_")})
    if out_path and parallel.is_leader():
        record = {**result, "provenance": provenance.record(
            ldm_seed=gen.cfg.get("seed"), eval_seed=seed)}
        paths.write_text(out_path, json.dumps(record, indent=2))
    return result


# ----------------------------------------------------------------------------- ControlNet

def _truth_inputs(truth: dict, frames: int, rate: float) -> dict:
    """A clip's ground-truth controls in the form `Generator.generate(controls=...)` takes."""
    from ldm_jax.controls import beat_grid

    pc = np.asarray(truth["pitch_class"])[:frames]
    one_hot = np.zeros((len(pc), 12), np.float32)
    one_hot[np.flatnonzero(pc >= 0), pc[pc >= 0]] = 1.0
    common = {"num_frames": len(pc), "frame_rate": rate}
    return {"melody": {**common, "melody": {"one_hot": one_hot, "pitch_class": pc}},
            "dynamics": {**common, "dynamics": {"db": np.asarray(truth["dynamics_db"],
                                                                 np.float32)[:frames]}},
            "rhythm": {**common, "rhythm": beat_grid(truth["beats"], truth["downbeats"],
                                                     len(pc), rate)}}


def _truth_segment(truth: dict, first: int, count: int, rate: float) -> dict:
    """The ground truth of frames [first, first + count), times relative to its start."""
    t0, t1 = first / rate, (first + count) / rate

    def times(x):
        x = np.asarray(x, np.float64)
        return x[(x >= t0) & (x < t1)] - t0

    return {"pitch_class": np.asarray(truth["pitch_class"])[first:first + count],
            "dynamics_db": np.asarray(truth["dynamics_db"])[first:first + count],
            "beats": times(truth["beats"]), "downbeats": times(truth["downbeats"])}


def _segment_scores(audio: np.ndarray, truth: dict, features, part: str) -> dict:
    """Control scores of the whole clip, or of its first or second half (split at a frame)."""
    from ldm_jax.controls import evaluate as control_eval

    if part == "whole":
        return control_eval.clip_scores(audio, truth, features)
    hop, frames = features.hop_length, len(truth["pitch_class"])
    half = frames // 2
    if part == "first_half":
        return control_eval.clip_scores(audio[:half * hop], _truth_segment(
            truth, 0, half + 1, features.frame_rate), features)
    clip = audio[half * hop:]
    return control_eval.clip_scores(clip, _truth_segment(
        truth, half, features.num_frames(len(clip)), features.frame_rate), features)


def paired_p_value(a: np.ndarray, b: np.ndarray, *, n: int = 10000, seed: int = 0) -> float:
    """One-sided p-value that the mean of A exceeds B's over paired clips: a sign-flip
    permutation test of the per-clip differences (pairs with a NaN left out)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return float("nan")
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, d.size))
    null = (signs * d).mean(axis=1)
    return float((1 + np.sum(null >= d.mean())) / (n + 1))


def frechet_interval(real: np.ndarray, generated: np.ndarray, *, n: int = 1000,
                     seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the Fréchet distance, resampling the generated
    clips (the real set fixed)."""
    rng = np.random.default_rng(seed)
    values = [frechet_distance(real, generated[rng.integers(0, len(generated), len(generated))])
              for _ in range(n)]
    return [float(x) for x in np.quantile(values, [0.025, 0.975])]


def evaluate_controls(workdir: str, source, settings, *, ceiling: dict | None = None,
                      generator=None, progress: bool = True) -> dict:
    """Music ControlNet's evaluation: how closely generated clips follow given controls.

    On the first `settings.num_prompts` clips of SOURCE (a dataset split built with control
    ground truth), each clip's caption is generated with its ground-truth controls (or, with
    `settings.inputs="audio"`, the controls extracted from the clip) under the same seeds in
    these conditions: `none` (text alone: the baseline), each control alone, `all`, and
    `first_half` (all controls given over the first half only). The controls of every
    generated clip are extracted and scored against the ground truth (`controls.evaluate`):
    melody accuracy, dynamics correlation, beat and downbeat F1, each with N and a bootstrap
    interval; for `none`, `all` and `first_half` also on each half of the clip. The Fréchet
    distance of each condition's CLAP audio embeddings to the real clips' has a bootstrap
    interval. `p_value/all_vs_none/METRIC` is a paired sign-flip permutation test; with the
    codec's ceiling (`chain.controls_ceiling`), `.../share_of_ceiling` divides by it.

    Args:
      workdir: W with the trained chain and W/controlnet.
      source: the test split (lazy sequence of examples with audio, caption and ground truth).
      settings: a `diffusion.config.ControlEvalConfig`.
      ceiling: the codec ceiling's scores (`W/codec/controls.json`), or None.
      generator: a `generate.Generator` to reuse.
      progress: progress bars on process 0.

    Returns:
      A flat dict, the same on every host.
    """
    from ldm_jax.controls import evaluate as control_eval
    from ldm_jax.controls.analysis import controls_from_audio
    from ldm_jax.diffusion import generate

    gen = generator or generate.Generator(workdir, batch_size=settings.batch_size)
    loaded = gen.controlnet
    features, names = loaded.features, list(loaded.controls)
    n = min(int(settings.num_prompts), len(source))
    examples = [source[i] for i in range(n)]
    prompts = [_string(e["caption"]) for e in examples]
    real = [np.asarray(e["audio"], np.float32).reshape(-1) for e in examples]
    rate = features.sample_rate
    if rate != gen.sample_rate:
        raise ValueError(f"the ControlNet's features are at {rate} Hz, the codec at "
                         f"{gen.sample_rate} Hz")
    seconds = settings.seconds or float(np.median([len(c) for c in real])) / rate
    samples = int(round(seconds * rate))
    frames = features.num_frames(samples)
    truths = [control_eval.ground_truth(e, frames, features.frame_rate) for e in examples]
    if settings.inputs == "truth":
        inputs = [_truth_inputs(t, frames, features.frame_rate) for t in truths]
    else:
        inputs = [controls_from_audio(np.pad(c[:samples], (0, max(0, samples - len(c)))),
                                      features) for c in real]
    conditions = {"none": ((), None)}
    conditions.update({name: ((name,), None) for name in names})
    conditions["all"] = (tuple(names), None)
    conditions["first_half"] = (tuple(names), {k: (0.0, seconds / 2) for k in names})
    real_emb = gen.clap.embed_audio(real, sample_rate=rate)
    boot = int(settings.bootstrap)
    result = {"num_clips": n, "seconds": float(seconds), "steps": int(settings.steps),
              "sampler": settings.sampler, "cfg_scale": float(settings.cfg_scale),
              "control_inputs": settings.inputs, "controls": names,
              "frame_rate": features.frame_rate}
    per_clip = {}
    for label, (given, ranges) in conditions.items():
        controls = None if not given else [{k: item[k] for k in given} for item in inputs]
        audio = gen.generate_shared(prompts, seconds=seconds, seed=settings.seed,
                                    steps=settings.steps, sampler=settings.sampler,
                                    cfg_scale=settings.cfg_scale, controls=controls,
                                    control_ranges=ranges,
                                    progress=progress and parallel.is_leader())
        audio = np.asarray(audio, np.float32).reshape(len(prompts), -1)
        parts = ("whole",) if label not in ("none", "all", "first_half") else \
            ("whole", "first_half", "second_half")

        def score(rows: range, parts=parts, audio=audio):
            return [{p: _segment_scores(audio[i], truths[i], features, p) for p in parts}
                    for i in rows]

        rows = [r for batch in parallel.map_batches(score, n, settings.batch_size) for r in batch]
        for part in parts:
            prefix = label if part == "whole" else f"{label}/{part}"
            summary = control_eval.summarize([r[part] for r in rows], seed=settings.seed)
            for metric in control_eval.METRICS:
                s = summary[metric]
                result[f"{prefix}/{metric}"] = s["mean"]
                result[f"{prefix}/{metric}/n"] = s["n"]
                result[f"{prefix}/{metric}/ci95"] = s["ci95"]
            result[f"{prefix}/dynamics_correlation_pooled"] = \
                summary["dynamics_correlation_pooled"]
        per_clip[label] = {m: np.asarray([r["whole"][m] for r in rows], np.float64)
                           for m in control_eval.METRICS}
        emb = gen.clap.embed_audio(list(audio), sample_rate=rate)
        result[f"{label}/fd_clap"] = frechet_distance(real_emb, emb)
        result[f"{label}/fd_clap/ci95"] = frechet_interval(
            real_emb, emb, n=int(settings.fd_bootstrap), seed=settings.seed)
    for metric in control_eval.METRICS:
        result[f"p_value/all_vs_none/{metric}"] = paired_p_value(
            per_clip["all"][metric], per_clip["none"][metric], n=10 * boot, seed=settings.seed)
        none = result[f"none/{metric}"]
        result[f"all/{metric}/over_none"] = result[f"all/{metric}"] / none if none else \
            float("nan")
        if ceiling and f"codec/{metric}" in ceiling:
            result[f"ceiling/{metric}"] = ceiling[f"codec/{metric}"]
            result[f"ceiling_real/{metric}"] = ceiling.get(f"real/{metric}")
            top = ceiling[f"codec/{metric}"]
            for label in conditions:
                result[f"{label}/{metric}/share_of_ceiling"] = \
                    result[f"{label}/{metric}"] / top if top else float("nan")
    return result


# ----------------------------------------------------------------------------- DITTO

def _summary(values, *, seed: int, n: int) -> dict:
    """Mean, N and 95% bootstrap interval of the finite values."""
    from ldm_jax.controls.metrics import bootstrap_interval

    v = [float(x) for x in np.ravel(values) if np.isfinite(x)]
    low, high = bootstrap_interval(v, n=n, seed=seed)
    return {"mean": float(np.mean(v)) if v else float("nan"), "n": len(v), "ci95": [low, high]}


def _loop_scores(audio: np.ndarray, loop_frames: int, frames: int, frame_rate: float,
                 sample_rate: int) -> dict:
    """Per clip: the seam of the loop played twice (`eval.seams`), cut hard where the matched
    end region begins (`seam_hard`) and as `ditto.loop_audio` makes it (`seam`), each over the
    clip's own median (`..._over_within`) and as the share of the clip's own positions below it
    (`..._rank`: 0.5 for an ordinary moment); and `mismatch`, how different the end region
    sounds from the start (`eval.seams.spectral_mismatch`, dB)."""
    from ldm_jax.diffusion import ditto
    from ldm_jax.eval.seams import seam_discontinuity, spectral_mismatch

    cut = int(round((frames - loop_frames) / frame_rate * sample_rate))
    fade = int(round(loop_frames / frame_rate * sample_rate))
    looped = ditto.loop_audio(audio, loop_frames, frames, frame_rate, sample_rate)
    out = {}
    for name, clips in (("seam_hard", audio[:, :cut]), ("seam", looped)):
        found = [seam_discontinuity(np.concatenate([a, a]), [len(a) / sample_rate],
                                    sample_rate) for a in clips]
        out[name] = np.asarray([m["seam_mean"] for m in found])
        out[f"{name}_over_within"] = out[name] / np.asarray([m["within_median"]
                                                             for m in found])
        out[f"{name}_rank"] = np.asarray([m["seam_rank"] for m in found])
    out["mismatch"] = np.asarray([spectral_mismatch(a[cut:cut + fade], a[:fade], sample_rate)
                                  for a in audio])
    return out


def _ditto_batch(runner, examples, rows: range, settings, optimiser, controlnet) -> dict:
    """DITTO on the clips of ROWS for every task: per-clip scores of plain sampling, DITTO and
    (intensity, melody) the ControlNet, with the CLAP embeddings of every output."""
    from ldm_jax.codec import losses as codec_losses
    from ldm_jax.controls import analysis, melody_accuracy
    from ldm_jax.diffusion import ditto
    gen, features = runner.gen, runner.features
    seconds = float(settings.seconds)
    frames, samples, _ = runner.frames(seconds)
    group = [examples[i] for i in rows]
    prompts = [_string(e["caption"]) for e in group]
    real = np.zeros((len(group), samples), np.float32)
    for r, e in enumerate(group):
        clip = np.asarray(e["audio"], np.float32).reshape(-1)[:samples]
        real[r, :len(clip)] = clip
    found = [analysis.controls_from_audio(c, features) for c in real]
    seeds = [settings.seed + i for i in rows]
    db = np.stack([np.asarray(f["dynamics"]["db"], np.float32) for f in found])
    pc = np.stack([np.asarray(f["melody"]["pitch_class"]) for f in found])
    embed = functools.partial(gen.clap.embed_audio, sample_rate=gen.sample_rate)
    rate = gen.stats.frame_rate

    def pitch_classes(audio):
        return np.stack([np.asarray(analysis.controls_from_audio(a, features)["melody"]
                                    ["pitch_class"]) for a in audio])

    def melody_scores(audio):
        est = pitch_classes(audio)
        return [melody_accuracy(pc[i], est[i]) for i in range(len(audio))]

    out = {"real": embed(list(real)), "seconds": {}, "compile_seconds": {}, "memory_bytes": {},
           "iterations": {}}
    plain = None
    for task in settings.tasks:
        plan = {}
        if task == "intensity":
            terms = [ditto.intensity(db)]
        elif task == "melody":
            terms = [ditto.melody(pc)]
        elif task == "structure":
            terms = [ditto.structure(settings.structure_pattern)]
        elif task == "loop":
            plan["loop_frames"] = int(round(settings.loop_seconds * rate))
            terms = [ditto.loop(plan["loop_frames"])]
        else:  # outpaint: continue each clip from its second half
            have = -(-samples // gen.codec.config.hop_length)
            reference = gen.encode_audio(list(real), have)[0]
            w = have // 2
            known = np.zeros((len(group), frames, reference.shape[-1]), np.float32)
            known[:, :w] = reference[:, have - w:]
            terms = [ditto.region(known, np.arange(frames) < w)]
        result = runner.run(prompts, terms, config=optimiser, seconds=seconds, seed=seeds)
        out["seconds"][task] = result["seconds"]
        out["compile_seconds"][task] = result["compile_seconds"]
        out["memory_bytes"][task] = result["memory_bytes"]
        out["iterations"][task] = result["iterations"]
        variants = {"plain": result["initial_audio"], "ditto": result["audio"]}
        if "resampled_audio" in result:  # x_T* and x_T sampled again with more steps
            variants["resampled"] = result["resampled_audio"]
            variants["plain_resampled"] = result["initial_resampled_audio"]
        if plain is None:
            plain = result["initial_audio"]
            out["plain_embedding"] = embed(list(plain))
        scores = {}
        if task in ("intensity", "melody") and controlnet:
            name = "dynamics" if task == "intensity" else "melody"
            variants["controlnet"] = gen.generate(
                prompts, seconds=seconds, seed=seeds, steps=settings.controlnet_steps,
                sampler=settings.controlnet_sampler, cfg_scale=optimiser.cfg_scale,
                controls=[{name: f} for f in found])
        for label, audio in variants.items():
            if task == "intensity":
                s = {"mse_db2": ditto.audio_losses(terms, audio, features)[0]}
            elif task == "melody":
                s = {"accuracy": np.asarray(melody_scores(audio))}
            elif task == "structure":
                s = {"ssm_mse": ditto.audio_losses(terms, audio, features)[0]}
            elif task == "loop":
                s = _loop_scores(np.asarray(audio), plan["loop_frames"], frames, rate,
                                 gen.sample_rate)
            else:  # the output's first w frames against the reference's last w
                hop = gen.codec.config.hop_length
                recon = gen.codec.roundtrip(real[..., None])[..., 0]
                span = min(w * hop, recon.shape[1] - (have - w) * hop)
                target = real[:, (have - w) * hop:][:, :span]

                def distance(x, target=target):
                    return np.asarray([float(codec_losses.mel_loss(
                        a[None, :, None], b[None, :, None], gen.sample_rate))
                        for a, b in zip(x, target)])

                s = {"region_mel_distance": distance(np.asarray(audio)[:, :span])}
                if label == "plain":  # what the codec itself keeps of that region
                    s["codec_mel_distance"] = distance(recon[:, (have - w) * hop:][:, :span])
            scores[label] = {k: np.asarray(v, np.float64) for k, v in s.items()}
            if label != "plain":
                scores[label]["embedding"] = embed(list(np.asarray(audio)))
        out[task] = scores
    return out


def evaluate_ditto(workdir: str, source, settings, optimiser, *, generator=None,
                   progress: bool = True) -> dict:
    """DITTO's evaluation: each task's control error before and after optimising the noise.

    On the first `settings.num_clips` clips of SOURCE (a test split with audio and captions),
    targets are taken from the real clips' first `settings.seconds` (never from the model's
    outputs): their smoothed dB curve (intensity: MSE in dB^2), their melody (melody: accuracy
    of the output's pitch classes), their second half to continue (outpaint: mel distance of
    the output's first half to it, beside the codec's own reconstruction error of it); the
    structure task asks for `settings.structure_pattern` (self-similarity MSE) and the loop
    task for a seamless loop (the seam's spectral discontinuity against the clip's own median,
    `eval.seams`). Each caption is sampled from the seed's noise (plain sampling, the same
    sampler and steps), optimised with OPTIMISER (a `ditto.DittoConfig`), and, where W has a
    ControlNet, generated through it with the same controls (intensity, melody). Every metric
    has its mean, N and a bootstrap interval; `p_value/TASK/METRIC` is a paired sign-flip test
    that DITTO improves on plain sampling; the Fréchet distance of the CLAP embeddings to the
    real clips' (with an interval) and the CLAP score are given for each output; wall time,
    compile time and XLA's memory estimate per task.

    Args:
      workdir: W with the trained chain (and W/controlnet, optionally).
      source: the test split (lazy sequence of examples with audio and caption).
      settings: a `diffusion.config.DittoEvalConfig`.
      optimiser: a `ditto.DittoConfig`.
      generator: a `generate.Generator` to reuse.
      progress: a progress bar over batches on process 0.

    Returns:
      A flat dict, the same on every host.
    """
    from ldm_jax.diffusion import ditto, generate

    gen = generator or generate.Generator(workdir, batch_size=settings.batch_size)
    runner = ditto.Ditto.of(gen)
    n = min(int(settings.num_clips), len(source))
    if n < 2:
        raise DiffusionError(f"the DITTO evaluation needs at least 2 test clips, the split "
                             f"has {len(source)}")
    controlnet = gen.root is not None and paths.isdir(
        os.path.join(gen.root, "controlnet", "checkpoints"))
    batches = parallel.map_batches(
        lambda rows: _ditto_batch(runner, source, rows, settings, optimiser, controlnet), n,
        settings.batch_size, desc="ditto eval" if progress else None)
    boot, seed = int(settings.bootstrap), int(settings.seed)
    real = np.concatenate([b["real"] for b in batches])
    plain_emb = np.concatenate([b["plain_embedding"] for b in batches])
    prompts = [_string(source[i]["caption"]) for i in range(n)]
    text = gen.clap.embed_text(prompts)
    result = {"num_clips": n, "seconds": float(settings.seconds), "controlnet": controlnet,
              "optimiser": optimiser.to_dict(), "settings": settings.to_dict(),
              "fd_clap/real_vs_plain": frechet_distance(real, plain_emb),
              "fd_clap/real_vs_plain/ci95": frechet_interval(real, plain_emb,
                                                             n=settings.fd_bootstrap, seed=seed),
              "clap_score/plain": clap_score(plain_emb, text)}
    lower_is_better = {"mse_db2", "ssm_mse", "seam", "seam_over_within", "seam_rank",
                       "seam_hard", "seam_hard_over_within", "seam_hard_rank", "mismatch",
                       "region_mel_distance"}
    for task in settings.tasks:
        labels = batches[0][task].keys()
        for label in labels:
            metrics = [k for k in batches[0][task][label] if k != "embedding"]
            for metric in metrics:
                values = np.concatenate([b[task][label][metric] for b in batches])
                s = _summary(values, seed=seed, n=boot)
                key = f"{task}/{label}/{metric}"
                result[key], result[f"{key}/n"], result[f"{key}/ci95"] = \
                    s["mean"], s["n"], s["ci95"]
                if label not in ("plain", "plain_resampled") and \
                        metric != "codec_mel_distance":
                    reference = "plain_resampled" if label == "resampled" else "plain"
                    base = np.concatenate([b[task][reference][metric] for b in batches])
                    a, b_ = (base, values) if metric in lower_is_better else (values, base)
                    result[f"p_value/{task}/{label}_vs_{reference}/{metric}"] = \
                        paired_p_value(a, b_, n=10 * boot, seed=seed)
            if label != "plain":
                emb = np.concatenate([b[task][label]["embedding"] for b in batches])
                fd = frechet_distance(real, emb)
                result[f"{task}/{label}/fd_clap"] = fd
                result[f"{task}/{label}/fd_clap/ci95"] = frechet_interval(
                    real, emb, n=settings.fd_bootstrap, seed=seed)
                result[f"{task}/{label}/fd_over_plain"] = fd / result["fd_clap/real_vs_plain"]
                result[f"{task}/{label}/clap_score"] = clap_score(emb, text)
        for part in ("seconds", "compile_seconds", "iterations"):
            values = [b[part][task] for b in batches]
            result[f"{task}/{part}_per_batch"] = float(np.mean(values))
        result[f"{task}/seconds_per_clip"] = float(
            sum(b["seconds"][task] for b in batches) / n)
        result[f"{task}/memory_bytes"] = batches[0]["memory_bytes"][task]
    if "outpaint" in settings.tasks:
        ratio = result["outpaint/ditto/region_mel_distance"] / \
            result["outpaint/plain/codec_mel_distance"]
        result["outpaint/ditto/region_over_codec"] = ratio
    if "loop" in settings.tasks:
        for label in batches[0]["loop"]:
            for metric in ("seam", "seam_hard"):
                result[f"loop/{label}/{metric}_below_within_share"] = float(np.mean(
                    np.concatenate([b["loop"][label][f"{metric}_over_within"]
                                    for b in batches]) <= 1.0))
    result["batch_size"] = int(settings.batch_size)
    if settings.long_clips:
        result.update(_long_form_scores(gen, prompts[:settings.long_clips], settings,
                                        optimiser))
    return result


def _long_form_scores(gen, prompts: list[str], settings, optimiser) -> dict:
    """Long-form generation of each prompt at `settings.long_seconds` with each method: the
    seams' spectral discontinuity against the clips' own (`eval.seams`), with N and
    intervals, and the wall time."""
    import time

    from ldm_jax.eval.seams import seam_discontinuity

    out = {"long/seconds": float(settings.long_seconds), "long/num_clips": len(prompts)}
    window = {"window_seconds": settings.long_window_seconds or None,
              "overlap_seconds": settings.long_overlap_seconds or None}
    plan = gen.long_form_plan(settings.long_seconds, **window)
    if plan is None:
        raise DiffusionError(f"{settings.long_seconds} s is not longer than the window: raise "
                             "ditto.eval.long_seconds")
    out.update({"long/windows": plan["windows"],
                "long/window_seconds": (plan["window_frames"] - 1) / gen.stats.frame_rate,
                "long/overlap_seconds": plan["overlap_frames"] / gen.stats.frame_rate})
    for method in settings.long_forms:
        def batch(rows: range, method=method):
            start = time.perf_counter()
            audio = gen.generate([prompts[i] for i in rows], seconds=settings.long_seconds,
                                 seed=[settings.seed + i for i in rows],
                                 steps=settings.long_steps, sampler="dpmpp_2m",
                                 cfg_scale=optimiser.cfg_scale, long_form=method,
                                 ditto_config=optimiser, **window)
            seconds = time.perf_counter() - start
            return [seam_discontinuity(a, plan["boundaries"], gen.sample_rate) for a in audio], \
                seconds
        batches = parallel.map_batches(batch, len(prompts), settings.batch_size)
        found = [m for b, _ in batches for m in b]
        seams = np.asarray([v for m in found for v in m["seams"]])
        within = np.asarray([m["within_median"] for m in found])
        per_clip = np.asarray([m["seam_mean"] / m["within_median"] for m in found])
        for name, values in (("seam", seams), ("within_median", within),
                             ("seam_over_within", per_clip),
                             ("seam_rank", [m["seam_rank"] for m in found])):
            s = _summary(values, seed=settings.seed, n=settings.bootstrap)
            key = f"long/{method}/{name}"
            out[key], out[f"{key}/n"], out[f"{key}/ci95"] = s["mean"], s["n"], s["ci95"]
        out[f"long/{method}/seconds_per_clip"] = float(sum(t for _, t in batches) /
                                                       len(prompts))
    return out
