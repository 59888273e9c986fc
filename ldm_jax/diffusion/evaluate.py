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
