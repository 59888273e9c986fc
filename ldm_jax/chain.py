"""The experiment chain: data -> tokenizer -> codec -> latents -> CLAP -> LDM -> samples -> report.

Every stage writes into the workdir and records the config it ran with (`W/stages/NAME.json`). A
stage whose output is complete is skipped, so an interrupted chain resumes where it stopped; a
stage whose config changed since it ran is reported with every stage downstream of it, and the
chain stops rather than mixing outputs of two configs (`--rerun-stale` re-runs them). Given
another chain's workdir (`--reuse-from SRC`), a stage that is complete there with the same
recorded config, and whose inputs all came from SRC too, is copied instead of run.

On several hosts every host runs the chain. Process 0 alone decides what is stale and whether a
stage is complete, and tells the others (`parallel.broadcast_from_leader`): hosts on a shared
file system can see different states of the same files, and hosts that disagree would wait for
each other forever. Which hosts run a stage:

- all of them for training (codec, clap, ldm: one sharded step over every device), and for the
  work that only reads trained models — codec_eval, clap_eval, latents, samples and
  generation_eval — whose batches are shared among the hosts (`parallel.map_batches`), so they
  scale with the hosts and give a single host's results; trained models are read by
  `checkpoint.read_state`, which synchronises nobody;
- process 0 alone (`parallel.on_leader`) for data, tokenizer and report, which write one dataset,
  one file or one page from host code and would race if several hosts wrote them. Inside them
  any multi-host call is a `parallel.MultiHostError`, also on one host.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

from ldm_jax import config as config_lib
from ldm_jax import paths


class StaleStage(RuntimeError):
    """A finished stage ran with another config; the message lists the stale stages."""


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the chain.

    Attributes:
      name: stage name, also the name of its output directory under W where it has one.
      after: the stages whose outputs it reads.
      sections: config paths ("data", "codec") whose values it depends on.
      done: `(cfg, W) -> bool`: is its output complete?
      run: `(cfg, W) -> dict`: runs it and returns a summary for the report.
      outputs: paths under W that belong to it (removed when a stale stage re-runs).
      all_hosts: runs on every JAX process (training, and work shared by batches); other
        stages run on process 0 while the others wait, and may make no multi-host call.
    """

    name: str
    after: tuple[str, ...]
    sections: tuple[str, ...]
    done: Callable
    run: Callable
    outputs: tuple[str, ...] = ()
    all_hosts: bool = False


def _is_leader() -> bool:
    from ldm_jax import parallel
    return parallel.is_leader()


def _section(cfg, path: str):
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node.to_dict() if hasattr(node, "to_dict") else node


def fingerprint(cfg, stage: Stage) -> dict:
    return json.loads(json.dumps({s: _section(cfg, s) for s in stage.sections}, default=list))


def _section_types() -> dict:
    """Config paths whose section is a model package's config dataclass."""
    from ldm_jax.clap.model import ClapConfig
    from ldm_jax.codec.model import CodecConfig
    from ldm_jax.diffusion.config import (
        ControlEvalConfig,
        DiffusionConfig,
        EvalConfig,
        GenerationConfig,
        TrainConfig,
    )
    from ldm_jax.diffusion.controlnet import ControlMaskConfig
    from ldm_jax.diffusion.unet import UNetConfig

    return {("codec", "model"): CodecConfig, ("clap", "model"): ClapConfig,
            ("ldm", "model"): UNetConfig, ("ldm", "diffusion"): DiffusionConfig,
            ("ldm", "train"): TrainConfig, ("ldm", "generation"): GenerationConfig,
            ("ldm", "eval"): EvalConfig, ("ldm.generation",): GenerationConfig,
            ("ldm.eval",): EvalConfig, ("controlnet", "eval"): ControlEvalConfig,
            ("controlnet", "masks"): ControlMaskConfig, ("controlnet.eval",): ControlEvalConfig}


def _without_unused_losses(node):
    """NODE with the zero entries of every `loss_weights` dict dropped: a loss of weight 0 is
    not computed, so a loss added to an experiment switched off leaves its stages as they were."""
    if not isinstance(node, dict):
        return node
    return {k: ({n: w for n, w in v.items() if w != 0} if k == "loss_weights"
                and isinstance(v, dict) else _without_unused_losses(v))
            for k, v in node.items()}


def _with_defaults(recorded: dict) -> dict:
    """A stage's recorded config with every dataclass section completed by its defaults (and
    losses of weight 0 left out), so that a field added to a model's config with a default, or a
    loss added switched off, does not make old stages stale."""
    out = _without_unused_losses(json.loads(json.dumps(recorded)))
    for path, cls in _section_types().items():
        parent = out
        for part in path[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(path[-1]), dict):
            try:
                parent[path[-1]] = cls.from_dict(parent[path[-1]]).to_dict()
            except (ValueError, TypeError):
                pass  # not a valid section: compared as written
    return out


def _record_path(workdir: str, name: str) -> str:
    return os.path.join(workdir, "stages", f"{name}.json")


def downstream(stages: list[Stage], name: str) -> list[str]:
    """The stage and every stage that (transitively) reads its output, in chain order."""
    out = [name]
    for s in stages:
        if any(a in out for a in s.after) and s.name not in out:
            out.append(s.name)
    return out


def stale_stages(stages: list[Stage], cfg, workdir: str) -> dict[str, list[str]]:
    """{stage: differing keys} for finished stages whose recorded config differs from cfg."""
    stale = {}
    for stage in stages:
        path = _record_path(workdir, stage.name)
        if not paths.exists(path):
            continue
        diffs = _config_diffs(json.loads(paths.read_text(path)).get("config", {}), cfg, stage)
        if diffs:
            stale[stage.name] = diffs
    return stale


def _config_diffs(recorded: dict, cfg, stage: Stage) -> list[str]:
    from ldm_jax.checkpoint import config_differences
    return config_differences(_with_defaults(recorded), _with_defaults(fingerprint(cfg, stage)))


def _reuse(stage: Stage, cfg, source: str, workdir: str, reused: set[str]) -> dict | None:
    """Copies STAGE's outputs and record from chain workdir SOURCE into WORKDIR when they can
    stand in for running it: complete there, recorded with the config CFG gives it, and every
    stage it reads reused from SOURCE as well (a stage trained again here, even with the same
    config, is another model). Returns the recorded summary, or None."""
    record = _record_path(source, stage.name)
    if (not stage.outputs or any(a not in reused for a in stage.after)
            or not paths.exists(record) or not stage.done(cfg, source)):
        return None
    recorded = json.loads(paths.read_text(record))
    if _config_diffs(recorded.get("config", {}), cfg, stage):
        return None
    for out in stage.outputs:
        src, dst = os.path.join(source, out), os.path.join(workdir, out)
        if paths.isdir(src):
            paths.rmtree(dst)
            paths.copy_tree(src, dst)
        elif paths.isfile(src):
            paths.copy_file(src, dst)
    paths.write_text(_record_path(workdir, stage.name),
                     json.dumps(dict(recorded, reused_from=source), indent=2, default=str))
    return recorded.get("summary", {})


def run_chain(stages: list[Stage], cfg, workdir: str, *, only: list[str] | None = None,
              rerun_stale: bool = False, reuse_from: str | None = None,
              print_fn=print) -> dict:
    """Runs the stages in order, skipping complete ones.

    Args:
      stages: the chain, in order.
      cfg: the experiment config.
      workdir: W.
      only: run just these stages (their inputs must be complete).
      rerun_stale: remove and re-run stages whose config changed, and those downstream.
      reuse_from: another chain's workdir whose matching complete stages are copied, not run.
      print_fn: where progress lines go.

    Returns:
      {stage: summary} of the stages that ran or were found complete.

    Raises:
      StaleStage: a finished stage's config changed and `rerun_stale` is False.
    """
    from ldm_jax import parallel

    names = [s.name for s in stages]
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise config_lib.ConfigError(f"unknown stage(s) {', '.join(unknown)}; the chain is "
                                     f"{' -> '.join(names)}")
    print_fn = print_fn if _is_leader() else (lambda *a, **k: None)
    if reuse_from:
        reuse_from = paths.resolve(reuse_from)
        if reuse_from == paths.resolve(workdir):
            raise config_lib.ConfigError(f"--reuse-from {reuse_from} is the workdir itself")
        if not paths.isdir(os.path.join(reuse_from, "stages")):
            raise config_lib.ConfigError(f"--reuse-from {reuse_from}: not a chain's workdir "
                                         "(it has no stages/ records)")
    reused: set[str] = set()  # stages whose outputs here came from REUSE_FROM (process 0)

    def prepare():
        paths.makedirs(os.path.join(workdir, "stages"))
        stale = stale_stages(stages, cfg, workdir)
        if stale:
            affected = []
            for name in stale:
                affected += [n for n in downstream(stages, name) if n not in affected]
            first = next(iter(stale))
            if not rerun_stale:
                raise StaleStage(f"the config of stage {first} changed since it ran in "
                                 f"{workdir} (" + "; ".join(stale[first][:3]) + "); stale: "
                                 f"{', '.join(affected)}. Re-run them with --rerun-stale or use "
                                 "another --workdir")
            by_name = {s.name: s for s in stages}
            for name in affected:
                for out in by_name[name].outputs:
                    paths.rmtree(os.path.join(workdir, out))
                paths.remove(_record_path(workdir, name))
            print_fn(f"re-running stale stages: {', '.join(affected)}")
        paths.write_text(os.path.join(workdir, "config.json"), config_lib.to_json(cfg))

    parallel.on_leader("the chain's start", prepare)
    summaries = {}
    for stage in stages:
        if only and stage.name not in only:
            continue
        record = _record_path(workdir, stage.name)

        def recorded(stage=stage, record=record):
            if stage.done(cfg, workdir) and paths.exists(record):
                found = json.loads(paths.read_text(record))
                if reuse_from and found.get("reused_from") == reuse_from:
                    reused.add(stage.name)
                return found.get("summary", {}), "complete, skipped"
            if reuse_from:
                summary = _reuse(stage, cfg, reuse_from, workdir, reused)
                if summary is not None:
                    reused.add(stage.name)
                    return summary, f"reused from {reuse_from}"
            return None

        # Process 0 judges, every host follows.
        done = parallel.on_leader(f"the check of stage {stage.name}", recorded, share=True)
        if done is not None:
            summaries[stage.name], how = done
            print_fn(f"[{stage.name}] {how}")
            continue
        print_fn(f"[{stage.name}] running")
        start = time.time()
        if stage.all_hosts:
            summary = stage.run(cfg, workdir) or {}
        else:
            summary = parallel.on_leader(f"stage {stage.name}",
                                         lambda stage=stage: stage.run(cfg, workdir)) or {}
        summary = dict(summary, seconds=round(time.time() - start, 1))
        summaries[stage.name] = summary

        def write_record(stage=stage, record=record, summary=summary):
            paths.write_text(record, json.dumps({"config": fingerprint(cfg, stage),
                                                 "summary": summary}, indent=2, default=str))

        # Also the stage's barrier: no host starts the next stage before the record is written.
        parallel.on_leader(f"the record of stage {stage.name}", write_record)
        print_fn(f"[{stage.name}] done in {summary['seconds']:.0f} s")
    return summaries


# ------------------------------------------------------------------------------- the stages

def layout(cfg, workdir: str):
    """The workdir layout of chain experiment CFG (`workdir.layout`)."""
    from ldm_jax import workdir as workdir_lib
    return workdir_lib.layout(cfg, workdir)


def data_dir(cfg, workdir: str) -> str:
    return layout(cfg, workdir).data_dir


def tokenizer_path(cfg, workdir: str) -> str:
    return layout(cfg, workdir).tokenizer


def _data_done(cfg, workdir):
    from ldm_jax.data import builders
    try:
        builders.dataset_info(data_dir(cfg, workdir), cfg.data.name)
        return True
    except builders.DataError:
        return False


def _data_run(cfg, workdir):
    from ldm_jax.data import builders
    summary = builders.build(cfg.data.name, cfg.data, data_dir(cfg, workdir), print_fn=print)
    return {"splits": summary.get("splits", {}), "skipped": len(summary.get("skipped", []))}


def _tokenizer_done(cfg, workdir):
    return paths.isfile(tokenizer_path(cfg, workdir))


def train_tokenizer(cfg, layout_) -> dict:
    """The tokenizer stage (also `ldm-jax tokenizer train`): SentencePiece on the training
    captions of `cfg.data.name`, saved at `layout_.tokenizer`.

    Returns:
      {"path", "vocab_size", "captions", "max_length", "longest", "median", "cut"}: the
      caption token lengths against `tokenizer.max_length` (`cut` captions lose their ends).
    """
    import numpy as np

    from ldm_jax.clap.text import Tokenizer
    from ldm_jax.data import builders
    captions = builders.captions(builders.open_split(layout_.data_dir, cfg.data.name, "train"))
    tok = Tokenizer.train(captions, vocab_size=cfg.tokenizer.vocab_size,
                          model_type=cfg.tokenizer.model_type)
    tok.save(layout_.tokenizer)
    lengths = tok.lengths(captions)
    limit = int(cfg.tokenizer.max_length)
    return {"path": layout_.tokenizer, "vocab_size": tok.vocab_size, "captions": len(captions),
            "max_length": limit, "longest": int(lengths.max()),
            "median": int(np.median(lengths)), "cut": int(np.sum(lengths > limit)),
            "example": captions[0], "example_tokens": tok.encode(captions[0], limit)[0].tolist()}


def _tokenizer_run(cfg, workdir):
    summary = train_tokenizer(cfg, layout(cfg, workdir))
    return {"vocab_size": summary["vocab_size"], "captions": summary["captions"]}


def _stage_steps_done(cfg, workdir, name):
    from ldm_jax.checkpoint import latest_step
    step = latest_step(os.path.join(workdir, name, "checkpoints"))
    return step is not None and step >= cfg[name].train.steps


# What each trained stage reports from its history: the last value of this metric.
TRAINERS = {"codec": ("ldm_jax.codec.train", "train/mel/loss", "mel_loss"),
            "clap": ("ldm_jax.clap.train", None, None),
            "ldm": ("ldm_jax.diffusion.train", "train/loss", "loss"),
            "judge": ("ldm_jax.judge.train", "train/loss", "loss"),
            "controlnet": ("ldm_jax.diffusion.controlnet_train", "train/loss", "loss")}


def train_stage(name: str, cfg, layout_):
    """Trains (or resumes) stage NAME (codec, clap or ldm) of stage config CFG: the one way in
    for the chain and for `ldm-jax train NAME`. Every trainer is `train(cfg, layout)`.

    Returns:
      The trainer's `loop.TrainResult` (`preempted` when a signal stopped it).
    """
    import importlib

    if name not in TRAINERS:
        raise config_lib.ConfigError(f"no trainer for stage {name!r}; use one of "
                                     f"{', '.join(TRAINERS)}")
    module = importlib.import_module(TRAINERS[name][0])
    return module.train(cfg, layout_)


def _trained(name):
    def run(cfg, workdir):
        result = train_stage(name, cfg[name], layout(cfg, workdir))
        if result.preempted:
            raise KeyboardInterrupt
        _, metric, key = TRAINERS[name]
        last = [r for r in result.history if metric and metric in r]
        summary = {"steps": result.step}
        if key:
            summary[key] = last[-1][metric] if last else None
        return summary
    return run


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """An evaluation stage: scores of a trained stage, written as one JSON with its provenance,
    shown in the report under TITLE, and the summary keys shown in the chain's stage table.
    A model family adds its evaluations to `evaluations()`; the chain and the report take them
    from there.

    Attributes:
      name: the stage name (`codec_eval`).
      title: the report's heading for its scores.
      after: the stage it evaluates.
      section: the config path it depends on.
      path: its JSON, relative to W.
      evaluate: `(cfg, workdir) -> scores`, called on every host (work shared by batches).
      seeds: `cfg -> {name: seed}` recorded in the JSON's provenance.
      summary: keys of the scores kept in the stage's summary (empty: all of them).
      requires: other stages it reads besides `after`.
    """

    name: str
    title: str
    after: str
    section: str
    path: str
    evaluate: Callable
    seeds: Callable
    summary: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()

    def stage(self) -> Stage:
        def done(cfg, workdir):
            return paths.isfile(os.path.join(workdir, self.path))

        def run(cfg, workdir):
            from ldm_jax import provenance
            scores = self.evaluate(cfg, workdir)
            if _is_leader():
                record = {**scores, "provenance": provenance.record(**self.seeds(cfg))}
                paths.write_text(os.path.join(workdir, self.path), json.dumps(record, indent=2))
            return {k: scores[k] for k in (self.summary or scores) if k in scores}

        return Stage(name=self.name, after=(self.after, *self.requires),
                     sections=(self.section,), done=done, run=run, outputs=(self.path,),
                     all_hosts=True)


def _codec_scores(cfg, workdir):
    from ldm_jax.codec import inference
    from ldm_jax.data import builders
    loaded = inference.load_trained(os.path.join(workdir, "codec"))
    source = builders.open_split(data_dir(cfg, workdir), cfg.data.name, "test")
    clips = builders.Column(source, "audio", cfg.codec.eval.num_examples)
    return inference.evaluate(loaded, clips, batch_size=cfg.codec.eval.batch_size)


def feature_config(cfg):
    """The control features of chain experiment CFG: its `controls.features` section at the
    data's sample rate, at the codec's latent frame rate unless the section sets one."""
    from ldm_jax.codec import CodecConfig
    from ldm_jax.controls import FeatureConfig
    return FeatureConfig.from_section(
        cfg.controls.features, sample_rate=int(cfg.data.sample_rate),
        frame_rate=CodecConfig.from_dict(cfg.codec.model).frame_rate)


def codec_roundtrip(workdir: str, sample_rate: int) -> Callable:
    """`[B, T] mono clips -> [B, T']` through the trained codec of W (encode, then decode)."""
    from ldm_jax.codec import inference
    loaded = inference.load_trained(os.path.join(workdir, "codec"))
    if loaded.sample_rate != sample_rate:
        raise config_lib.ConfigError(f"the codec runs at {loaded.sample_rate} Hz and the data at "
                                     f"{sample_rate} Hz")
    return lambda x: loaded.roundtrip(x[..., None])[..., 0]


def controls_ceiling(cfg, workdir, *, num_examples: int | None = None) -> dict:
    """Controls extracted from the real test clips and from their codec reconstructions,
    scored against the clips' ground truth (`ldm_jax.controls.evaluate`): what the codec lets
    through, the ceiling of every controlled generator on this data."""
    from ldm_jax.controls import evaluate as control_eval
    from ldm_jax.data import builders
    features = feature_config(cfg)
    e = cfg.controls.eval
    source = builders.open_split(data_dir(cfg, workdir), cfg.data.name, "test")
    clips = builders.Column(source, None, num_examples or e.num_examples)
    reconstruct = codec_roundtrip(workdir, features.sample_rate)
    out = {"frame_rate": features.frame_rate, "num_clips": len(clips)}
    for name, transform in (("real", None), ("codec", reconstruct)):
        scores = control_eval.score_clips(clips, features, transform=transform,
                                          batch_size=e.batch_size, seed=e.seed)
        for metric in control_eval.METRICS:
            s = scores[metric]
            out[f"{name}/{metric}"] = s["mean"]
            out[f"{name}/{metric}/n"] = s["n"]
            out[f"{name}/{metric}/ci95"] = s["ci95"]
        out[f"{name}/dynamics_correlation_pooled"] = scores["dynamics_correlation_pooled"]
    return out


def controlnet_scores(cfg, workdir, *, num_prompts: int | None = None) -> dict:
    """The ControlNet's adherence to the test clips' controls (`diffusion.evaluate.
    evaluate_controls`), beside the codec's ceiling where `controls_eval` wrote it."""
    from ldm_jax.diffusion import evaluate as generation
    from ldm_jax.diffusion.config import ControlEvalConfig
    e = ControlEvalConfig.from_dict(cfg.controlnet.get("eval", None) or {})
    if num_prompts:
        e = e.replace(num_prompts=num_prompts)
    source = builders_open_test(cfg, workdir)
    ceiling = os.path.join(workdir, "codec", "controls.json")
    return generation.evaluate_controls(
        workdir, source, e, ceiling=json.loads(paths.read_text(ceiling))
        if paths.isfile(ceiling) else None)


def builders_open_test(cfg, workdir):
    """The test split of the chain's source dataset."""
    from ldm_jax.data import builders
    return builders.open_split(data_dir(cfg, workdir), cfg.data.name, "test")


def judge_scores(cfg, workdir) -> dict:
    """The judge's accuracy on the real test clips and, where the chain has a trained codec, on
    their codec reconstructions (the ceiling of a generator's judged adherence)."""
    from ldm_jax.data import builders
    from ldm_jax.judge import Predictor
    from ldm_jax.judge import evaluate as judge_eval
    e = cfg.judge.eval
    predictor = Predictor.load(os.path.join(workdir, "judge"))
    source = builders.open_split(data_dir(cfg, workdir), cfg.data.name, "test")
    clips = builders.Column(source, None, e.num_examples)
    out = {"num_clips": len(clips)}
    transforms = {"real": None}
    if _stage_steps_done(cfg, workdir, "codec"):
        transforms["codec"] = codec_roundtrip(workdir, predictor.sample_rate)
    for name, transform in transforms.items():
        scores = judge_eval.accuracy(predictor, clips, transform=transform,
                                     batch_size=e.batch_size, seed=e.seed)
        out.update({f"{name}/{k}": v for k, v in scores.items()})
    return out


def _clap_scores(cfg, workdir):
    from ldm_jax.clap import evaluate as clap_eval
    return clap_eval.evaluate(None, os.path.join(workdir, "clap"), data_dir(cfg, workdir))


def _generation_scores(cfg, workdir):
    from ldm_jax.diffusion import evaluate as generation
    from ldm_jax.diffusion.config import eval_config
    e = eval_config(cfg.ldm)
    return generation.evaluate_generation(
        workdir, os.path.join(workdir, "latents"), num_prompts=e.num_prompts, **e.sampling(),
        batch_size=e.batch_size)


def evaluations() -> list[Evaluation]:
    """Every evaluation the chain knows."""
    return [
        Evaluation(name="codec_eval", title="codec", after="codec", section="codec.eval",
                   path="codec/eval.json", evaluate=_codec_scores,
                   seeds=lambda cfg: {"codec_seed": cfg.codec.seed}),
        Evaluation(name="controls_eval", title="controls (ceiling)", after="codec",
                   section="controls", path="codec/controls.json", evaluate=controls_ceiling,
                   seeds=lambda cfg: {"codec_seed": cfg.codec.seed,
                                      "bootstrap_seed": cfg.controls.eval.seed},
                   summary=("real/melody_accuracy", "real/dynamics_correlation",
                            "real/beat_f1", "real/downbeat_f1", "codec/melody_accuracy",
                            "codec/dynamics_correlation", "codec/beat_f1",
                            "codec/downbeat_f1")),
        Evaluation(name="judge_eval", title="attribute judge", after="judge",
                   section="judge.eval", path="judge/eval.json", evaluate=judge_scores,
                   seeds=lambda cfg: {"judge_seed": cfg.judge.get("seed"),
                                      "bootstrap_seed": cfg.judge.eval.seed},
                   summary=("real/instrument_accuracy", "codec/instrument_accuracy",
                            "real/pattern_accuracy", "real/with_drums_accuracy"),
                   requires=("codec",)),
        Evaluation(name="controlnet_eval", title="ControlNet", after="controlnet",
                   section="controlnet.eval", path="controlnet/eval.json",
                   evaluate=controlnet_scores,
                   seeds=lambda cfg: {"controlnet_seed": cfg.controlnet.get("seed"),
                                      "eval_seed": cfg.controlnet.eval.seed},
                   summary=("none/melody_accuracy", "all/melody_accuracy",
                            "none/dynamics_correlation", "all/dynamics_correlation",
                            "none/beat_f1", "all/beat_f1", "none/fd_clap", "all/fd_clap")),
        Evaluation(name="clap_eval", title="clap", after="clap", section="clap.eval",
                   path="clap/eval.json", evaluate=_clap_scores,
                   seeds=lambda cfg: {"clap_seed": cfg.clap.seed},
                   summary=("text_to_audio/recall_at_10", "zero_shot/instrument",
                            "chance/recall_at_10", "chance/zero_shot/instrument")),
        Evaluation(name="generation_eval", title="generation", after="samples",
                   section="ldm.eval", path="samples/eval.json", evaluate=_generation_scores,
                   seeds=lambda cfg: {"ldm_seed": cfg.ldm.get("seed"),
                                      "eval_seed": cfg.ldm.eval.seed},
                   summary=("fd_clap", "untrained/fd_clap", "clap_score",
                            "generated/key_accuracy", "generated/tempo_accuracy",
                            "chance/key_accuracy", "chance/tempo_accuracy",
                            "shuffled/key_accuracy", "p_value/key_accuracy",
                            "shuffled/tempo_accuracy", "p_value/tempo_accuracy")),
    ]


def _latents_done(cfg, workdir):
    from ldm_jax.data import latents
    return latents.is_complete(os.path.join(workdir, "latents"))


def _latents_run(cfg, workdir):
    from ldm_jax.codec import latents as codec_latents
    summary = codec_latents.encode_latents(workdir, cfg.data, data_dir(cfg, workdir),
                                     os.path.join(workdir, "latents"))
    keys = ("splits", "latent", "latent_dim", "frame_rate", "scale_factor")
    return {k: summary[k] for k in keys if k in summary}


def _samples_done(cfg, workdir):
    return paths.isfile(os.path.join(workdir, "samples", "samples.json"))


def _samples_run(cfg, workdir):
    from ldm_jax.diffusion import generate
    from ldm_jax.diffusion.config import generation_config
    g = generation_config(cfg.ldm)
    index = generate.write_samples(workdir, list(g.prompts), **g.sampling(),
                                   generator=generate.get_generator(workdir, g.batch_size))
    return {"samples": len(index)}


def _report_run(cfg, workdir):
    from ldm_jax.eval import report
    path = report.write_report(workdir, evals={e.title: e.path for e in evaluations()})
    return {"report": path}


def _steps_done(name: str) -> Callable:
    return lambda cfg, workdir: _stage_steps_done(cfg, workdir, name)


def registry() -> dict[str, Stage]:
    """Every stage the chain knows, by name. A model family adds its stages here and names them
    in its chain experiment's `stages` list."""
    evals = {e.name: e.stage() for e in evaluations()}
    stages = [
        Stage(name="data", after=(), sections=("data",), done=_data_done, run=_data_run,
              outputs=("data",)),
        Stage(name="tokenizer", after=("data",), sections=("data", "tokenizer"),
              done=_tokenizer_done, run=_tokenizer_run, outputs=("tokenizer",)),
        Stage(name="codec", after=("data",), sections=("data", "codec"),
              done=_steps_done("codec"), run=_trained("codec"),
              outputs=("codec", "logs/codec"), all_hosts=True),
        evals["codec_eval"],
        evals["controls_eval"],
        Stage(name="judge", after=("data",), sections=("data", "judge"),
              done=_steps_done("judge"), run=_trained("judge"), outputs=("judge", "logs/judge"),
              all_hosts=True),
        evals["judge_eval"],
        Stage(name="clap", after=("data", "tokenizer"), sections=("data", "tokenizer", "clap"),
              done=_steps_done("clap"), run=_trained("clap"), outputs=("clap", "logs/clap"),
              all_hosts=True),
        evals["clap_eval"],
        Stage(name="latents", after=("codec",), sections=("data", "codec"), done=_latents_done,
              run=_latents_run, outputs=("latents",), all_hosts=True),
        Stage(name="ldm", after=("latents", "clap"), sections=("ldm",), done=_steps_done("ldm"),
              run=_trained("ldm"), outputs=("ldm", "logs/ldm"), all_hosts=True),
        Stage(name="controlnet", after=("ldm",), sections=("controlnet",),
              done=_steps_done("controlnet"), run=_trained("controlnet"),
              outputs=("controlnet", "logs/controlnet"), all_hosts=True),
        evals["controlnet_eval"],
        Stage(name="samples", after=("ldm",), sections=("ldm.generation",), done=_samples_done,
              run=_samples_run, outputs=("samples",), all_hosts=True),
        evals["generation_eval"],
        Stage(name="report", after=("codec_eval", "clap_eval", "generation_eval"), sections=(),
              done=lambda cfg, workdir: False, run=_report_run),
    ]
    return {s.name: s for s in stages}


# Stages only the experiments that declare them run (they need what the default data lacks).
OPTIONAL_STAGES = ("controls_eval", "judge", "judge_eval", "controlnet", "controlnet_eval")


def default_stages() -> list[Stage]:
    """The chain of DESIGN.md, as far as its models exist."""
    return [s for s in registry().values() if s.name not in OPTIONAL_STAGES]


def is_chain(cfg) -> bool:
    """Whether CFG is a chain experiment (it lists its `stages`) rather than one stage's."""
    return "stages" in cfg


def stages_for(cfg) -> list[Stage]:
    """The stages a chain experiment declares (`cfg.stages`, in order), or the default chain.

    Raises:
      ConfigError: a declared stage is unknown, or comes before a stage it reads from.
    """
    known = registry()
    if not is_chain(cfg):
        return default_stages()
    names = list(cfg.stages)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise config_lib.ConfigError(f"unknown stage(s) {', '.join(unknown)} in the "
                                     f"experiment's stages; known: {', '.join(known)}")
    for i, name in enumerate(names):
        late = [a for a in known[name].after if a in names[i:]]
        if late:
            raise config_lib.ConfigError(f"stage {name} reads {', '.join(late)}, which the "
                                         "experiment's stages list after it")
    return [known[n] for n in names]
