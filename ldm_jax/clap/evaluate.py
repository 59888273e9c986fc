"""CLAP evaluation: cross-modal retrieval recall and zero-shot classification.

Retrieval follows the CLAP / CLIP protocol (Elizalde et al. 2023; Radford et al. 2021): every test
caption ranks every test clip (and vice versa) by cosine similarity, and recall@k is the share of
queries whose own pair ranks in the top k. Zero-shot classification scores each clip against one
text embedding per class, the normalised mean over several prompts ("prompt ensembling", CLIP
section 3.1.4), for the attributes the synthetic generator records: instrument, mode
(major/minor), key (the tonic, 12 classes) and tempo class (slow/moderate/fast). Chance levels
are reported beside each score. The key task tells whether the text embedding can carry the key
into a diffusion model at all: it needs an audio tower that resolves semitones.

On several hosts every host calls these functions: the batches of clips and captions are shared
among the hosts (`parallel.map_batches`), the embeddings gathered, and every host computes the
same metrics, equal to a single host's.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence

import numpy as np

from ldm_jax import parallel, paths
from ldm_jax.clap import model as clap_model
from ldm_jax.clap.text import Tokenizer
from ldm_jax.data import synthetic

RECALL_AT = (1, 5, 10)
# Clip lengths are padded up to a multiple of this many seconds, so few shapes are compiled.
LENGTH_BUCKET_SECONDS = 1.0


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def instrument_prompts(instrument: str) -> list[str]:
    words = synthetic.INSTRUMENT_WORDS.get(instrument, (instrument.replace("_", " "),))
    return [p for w in words for p in (f"a piece played on {_article(w)}",
                                       f"the sound of {_article(w)}", f"{_article(w)} recording")]


def mode_prompts(mode: str) -> list[str]:
    return [f"a piece in {key} {mode}" for key in synthetic.KEYS] + [f"music in a {mode} key"]


def key_prompts(key: str) -> list[str]:
    spellings = (key,) + ((synthetic.KEY_SPELLINGS[key],) if key in synthetic.KEY_SPELLINGS else ())
    return [f"a piece in {k} {mode}" for k in spellings for mode in synthetic.MODES] + [
        f"music in the key of {k}" for k in spellings]


def tempo_prompts(tempo: str) -> list[str]:
    return ([f"{_article(w)} piece" for w in synthetic.TEMPO_WORDS[tempo]]
            + [f"a piece played {p}" for p in synthetic.TEMPO_PHRASES[tempo]])


# task -> (classes, prompts of a class, ground-truth class of an example or None to skip it).
ZERO_SHOT_TASKS: dict[str, tuple[Sequence[str], Callable, Callable]] = {
    "instrument": (synthetic.INSTRUMENTS, instrument_prompts,
                   lambda ex: ex.get("instrument") or None),
    "mode": (synthetic.MODES, mode_prompts, lambda ex: ex.get("mode") or None),
    # The tonic: a CLAP whose audio tower cannot resolve pitch scores chance (1/12) here.
    "key": (synthetic.KEYS, key_prompts, lambda ex: ex.get("key") or None),
    "tempo": (synthetic.TEMPI, tempo_prompts,
              lambda ex: synthetic.tempo_class(float(ex["tempo_bpm"]))
              if "tempo_bpm" in ex else None),
}


def recall_at_k(sim: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict[int, float]:
    """Share of queries (rows) whose own item (the diagonal) ranks in the top k.

    Args:
      sim: [N, N] similarities, query i paired with item i. Ties count against the query.

    Returns:
      {k: recall}.
    """
    sim = np.asarray(sim, np.float64)
    rank = np.sum(sim > np.diagonal(sim)[:, None], axis=1) + np.sum(
        (sim == np.diagonal(sim)[:, None]) & ~np.eye(len(sim), dtype=bool), axis=1)
    return {k: float(np.mean(rank < k)) for k in ks}


def embed_texts(text_fn, params, tokenizer: Tokenizer, texts: Sequence[str], max_length: int,
                batch_size: int) -> np.ndarray:
    """Captions -> float32 [N, E], in fixed-size batches (`text_fn` from `make_embedders`)
    shared among the hosts."""
    tokens, mask = tokenizer.encode(list(texts), max_length)

    def batch(rows: range) -> np.ndarray:
        t, m = tokens[rows.start:rows.stop], mask[rows.start:rows.stop]
        pad = batch_size - len(t)
        _, emb = text_fn(params, np.pad(t, [(0, pad), (0, 0)]), np.pad(m, [(0, pad), (0, 0)]))
        return np.asarray(emb)[: len(t)]

    return np.concatenate(parallel.map_batches(batch, len(texts), batch_size))


def embed_split(params, cfg, source, tokenizer: Tokenizer, embedders=None) -> dict:
    """Embeds every clip and caption of a split.

    Args:
      params: model parameters.
      cfg: the experiment config (`data`, `model`, `eval.batch_size`, `eval.crop_seconds`:
        centre crops of that length, 0 for whole clips).
      source: random-access examples (`open_split(...)`).
      tokenizer: the caption tokenizer.
      embedders: `clap_model.make_embedders(cfg)`, to reuse compiled functions.

    Returns:
      {"audio": [N, E], "text": [N, E], "caption": [N] str, plus each attribute field present
       (`id`, `instrument`, `mode`, `tempo_bpm`, ...) as a list}.
    """
    from ldm_jax.data import pipeline

    text_fn, audio_fn = embedders or clap_model.make_embedders(cfg)
    batch_size = int(cfg.eval.batch_size)
    rate = int(cfg.model.audio.sample_rate)
    crop = float(cfg.eval.get("crop_seconds", 0.0))
    limit = int(float(cfg.model.audio.max_seconds) * rate)
    crop = crop if crop > 0 else float(cfg.model.audio.max_seconds)
    first = source[0]
    fields = ["audio", "caption"] + [k for k in ("id", "instrument", "mode", "tempo_bpm", "key",
                                                 "pattern", "loudness") if k in first]
    # This host's batches; the others' come back through the gather below.
    data = pipeline.make_dataset(source, cfg.data, batch_size=batch_size, train=False,
                                 crop_seconds=crop, fields=fields, worker_count=0)
    bucket = int(LENGTH_BUCKET_SECONDS * rate)
    mine = []
    for batch in data:
        wave = np.asarray(batch["audio"], np.float32)
        wave = wave.mean(-1) if wave.ndim == 3 else wave
        mask = np.asarray(batch["audio_mask"], bool)
        n, length = wave.shape
        width = min(-(-length // bucket) * bucket, max(limit, length))
        wave = np.pad(wave, [(0, batch_size - n), (0, width - length)])
        mask = np.pad(mask, [(0, batch_size - n), (0, width - length)])
        row = {k: [v.decode() if isinstance(v, bytes) else v for v in batch[k].tolist()]
               for k in fields if k != "audio"}
        mine.append((np.asarray(audio_fn(params, wave, mask))[:n], row))
    batches = parallel.gather_batches(mine)
    out = {k: [v for _, row in batches for v in row[k]] for k in fields if k != "audio"}
    out["audio"] = np.concatenate([emb for emb, _ in batches])
    out["text"] = embed_texts(text_fn, params, tokenizer, out["caption"],
                              int(cfg.model.text.max_length), batch_size)
    return out


def zero_shot(audio: np.ndarray, labels: Sequence[str | None], classes: Sequence[str],
              prompts: Callable[[str], list[str]], embed: Callable[[list[str]], np.ndarray]
              ) -> tuple[float, float, int]:
    """Accuracy of nearest-class-prompt classification.

    Args:
      audio: [N, E] clip embeddings.
      labels: the true class of each clip (None: not applicable, skipped).
      classes: class names; prompts: class -> prompt texts; embed: texts -> [M, E].

    Returns:
      (accuracy, majority-class rate, number of clips scored).
    """
    keep = np.array([lab is not None for lab in labels])
    if not keep.any():
        return float("nan"), float("nan"), 0
    class_emb = []
    for c in classes:
        e = embed(prompts(c)).mean(0)
        class_emb.append(e / max(np.linalg.norm(e), 1e-12))
    scores = audio[keep] @ np.stack(class_emb).T
    truth = np.array([classes.index(lab) for lab in np.asarray(labels, object)[keep]])
    majority = np.bincount(truth, minlength=len(classes)).max() / len(truth)
    return float(np.mean(scores.argmax(1) == truth)), float(majority), int(keep.sum())


def evaluate_params(params, cfg, source, tokenizer: Tokenizer, embedders=None) -> dict:
    """Retrieval recall and zero-shot accuracies of `params` on a split.

    Returns:
      Flat dict of floats: `text_to_audio/recall_at_k`, `audio_to_text/recall_at_k`,
      `chance/recall_at_k` (k / N), and per zero-shot task `zero_shot/{task}`,
      `chance/zero_shot/{task}` (1 / classes) and `majority/zero_shot/{task}`.
    """
    embedders = embedders or clap_model.make_embedders(cfg)
    emb = embed_split(params, cfg, source, tokenizer, embedders)
    sim = emb["text"] @ emb["audio"].T
    n = len(sim)
    metrics = {}
    for k, v in recall_at_k(sim).items():
        metrics[f"text_to_audio/recall_at_{k}"] = v
    for k, v in recall_at_k(sim.T).items():
        metrics[f"audio_to_text/recall_at_{k}"] = v
        metrics[f"chance/recall_at_{k}"] = min(k / n, 1.0)
    embed = lambda texts: embed_texts(embedders[0], params, tokenizer, texts,
                                      int(cfg.model.text.max_length), int(cfg.eval.batch_size))
    examples = [{k: emb[k][i] for k in emb if k not in ("audio", "text")} for i in range(n)]
    for task, (classes, prompts, label) in ZERO_SHOT_TASKS.items():
        labels = [label(ex) for ex in examples]
        labels = [lab if lab in classes else None for lab in labels]
        acc, majority, count = zero_shot(emb["audio"], labels, list(classes), prompts, embed)
        if count:
            metrics[f"zero_shot/{task}"] = acc
            metrics[f"chance/zero_shot/{task}"] = 1.0 / len(classes)
            metrics[f"majority/zero_shot/{task}"] = majority
    return metrics


def make_evaluator(cfg, source, tokenizer: Tokenizer) -> Callable[[dict], dict]:
    """`state -> metrics` for the training loop (called on every host), compiled once."""
    embedders = clap_model.make_embedders(cfg)
    return lambda state: evaluate_params(parallel.host_local(state["params"]), cfg, source,
                                         tokenizer, embedders)


def _load(workdir: str, cfg=None, model=None):
    model = model if model is not None else clap_model.ClapModel.load(workdir)
    run_cfg = model.cfg
    if cfg is not None:
        # The model section must be the trained one; reading and eval settings may differ.
        run_cfg = cfg.copy_and_resolve_references()
        with run_cfg.unlocked():
            run_cfg.model = model.cfg.model
    return model, run_cfg


def evaluate(cfg, workdir: str, data_dir: str, split: str = "test", model=None) -> dict:
    """Evaluates the latest checkpoint in WORKDIR on a split of `cfg.data.name`.

    Args:
      cfg: the experiment config (None: the one saved with the run); its model section is
        replaced by the trained one.
      workdir: the CLAP stage directory.
      data_dir: the TFDS data directory.
      split: which split.
      model: an already loaded `ClapModel` of WORKDIR (reuses its compiled functions).

    Returns:
      The metrics of `evaluate_params`.
    """
    from ldm_jax.data import builders

    model, run_cfg = _load(workdir, cfg, model)
    source = builders.open_split(data_dir, run_cfg.data.name, split)
    return evaluate_params(model.params, run_cfg, source, model.tokenizer, model.embedders)


def retrieve(workdir: str, data_dir: str, query: str, top: int = 5, split: str = "test",
             cfg=None, model=None) -> list[tuple[str, str, float]]:
    """Ranks the clips of a split by similarity to a text query.

    Clip embeddings are cached in `workdir/embeddings_{split}.npz`, keyed by checkpoint step.

    Args:
      workdir: the CLAP stage directory.
      data_dir: the TFDS data directory.
      query: the text to search for.
      top: how many clips to return.
      split: which split to search.
      cfg: the experiment config (None: the one saved with the run).
      model: an already loaded `ClapModel` of WORKDIR.

    Returns:
      [(id, caption, cosine similarity)] for the `top` best clips, best first (the id is the
      example's `id` field, or its index when the dataset has none).
    """
    from ldm_jax.data import builders

    model, run_cfg = _load(workdir, cfg, model)
    cache = os.path.join(workdir, f"embeddings_{split}.npz")

    def cached():
        if not paths.isfile(cache):
            return None
        stored = np.load(io.BytesIO(paths.read_bytes(cache)), allow_pickle=False)
        if int(stored["step"]) != model.step or str(stored["data"]) != data_dir:
            return None
        return {"audio": stored["audio"], "id": stored["id"].tolist(),
                "caption": stored["caption"].tolist()}

    # Process 0 alone judges the cache, so that every host embeds the split or none does.
    emb = parallel.on_leader("the embedding cache check", cached, share=True)
    if emb is None:
        source = builders.open_split(data_dir, run_cfg.data.name, split)
        emb = embed_split(model.params, run_cfg, source, model.tokenizer, model.embedders)
        emb.setdefault("id", [str(i) for i in range(len(emb["audio"]))])
        if parallel.is_leader():
            buffer = io.BytesIO()
            np.savez(buffer, audio=emb["audio"], id=np.array(emb["id"], str),
                     caption=np.array(emb["caption"], str), step=model.step, data=data_dir)
            paths.write_bytes(cache, buffer.getvalue())
    scores = emb["audio"] @ model.embed_text([query])[0]
    order = np.argsort(-scores, kind="stable")[:top]
    return [(str(emb["id"][i]), str(emb["caption"][i]), float(scores[i])) for i in order]
