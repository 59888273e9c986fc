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
from ldm_jax.eval.metrics import clap_score, frechet_distance

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
            **music.adherence(analyses, references), "analyses": analyses}


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
                        progress: bool = True) -> dict:
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
      of CLAP.
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
    if untrained:
        baseline = score(_initial_params(gen, seed), desc="analyse untrained")
        baseline.pop("analyses")
        result.update({f"untrained/{k}": v for k, v in baseline.items()
                       if not k.startswith("n_")})
    if out_path and parallel.is_leader():
        record = {**result, "provenance": provenance.record(
            ldm_seed=gen.cfg.get("seed"), eval_seed=seed)}
        paths.write_text(out_path, json.dumps(record, indent=2))
    return result
