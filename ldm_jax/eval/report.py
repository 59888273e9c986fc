"""The self-contained HTML report of an experiment workdir (`W/report.html`).

Per stage: its summary and timing, loss curves, its evaluation metrics; then the generated samples
as playable audio with their spectrograms and prompts. Images and audio are embedded as data URIs,
so the file can be copied anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os

import numpy as np

from ldm_jax import paths, provenance
from ldm_jax.eval import plots

STAGE_CURVES = {
    "codec": ["train/loss", "train/mel/loss", "train/disc/loss", "train/adv/gen_loss"],
    "clap": ["train/loss"],
    "ldm": ["train/loss"],
    "controlnet": ["train/loss"],
}
EVAL_FILES = {"codec": "codec/eval.json", "clap": "clap/eval.json",
              "generation": "samples/eval.json"}


def _png_uri(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(paths.read_bytes(path)).decode()


def _wav_uri(audio: np.ndarray, sample_rate: int) -> str:
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, np.asarray(audio, np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(values: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>"
                   for k, v in values.items() if not isinstance(v, (dict, list)))
    return f"<table>{rows}</table>"


CONTROL_METRICS = ("melody_accuracy", "dynamics_correlation", "beat_f1", "downbeat_f1",
                   "fd_clap")


def _controls_table(values: dict) -> str:
    """The ControlNet evaluation as one row per condition (and clip half), one column per
    metric: mean [95% interval] (N), and the codec's ceiling as the last row."""
    labels = [k[:-len("/beat_f1")] for k in values if k.endswith("/beat_f1")
              and not k.startswith(("ceiling", "p_value"))]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in CONTROL_METRICS)
    rows = []
    for label in labels + ["ceiling"]:
        cells = []
        for m in CONTROL_METRICS:
            v = values.get(f"{label}/{m}")
            ci, n = values.get(f"{label}/{m}/ci95"), values.get(f"{label}/{m}/n")
            text = "" if v is None else _fmt(v)
            if ci:
                text += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
            if n is not None:
                text += f" ({n})"
            cells.append(f"<td>{text}</td>")
        rows.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}</tr>")
    p_values = {k: v for k, v in values.items() if k.startswith("p_value/")}
    return (f"<table><tr><th>condition</th>{head}</tr>{''.join(rows)}</table>"
            + _table(p_values))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _load_json(path: str):
    if paths.exists(path):
        return json.loads(paths.read_text(path))
    return None


def write_report(workdir: str, evals: dict[str, str] | None = None) -> str:
    """Writes `W/report.html` from whatever the stages left in W; returns its path.

    Args:
      workdir: W.
      evals: {title: JSON path relative to W} of the evaluations to show (default: the codec,
        CLAP and generation evaluations of the chain).
    """
    from ldm_jax.loop import read_history
    parts = [f"<h1>ldm_jax experiment</h1><p>{html.escape(paths.resolve(workdir))}</p>"]
    stage_dir = os.path.join(workdir, "stages")
    figures = os.path.join(workdir, "logs", "figures")
    names = paths.listdir(stage_dir) if paths.isdir(stage_dir) else []
    records = {n[:-5]: _load_json(os.path.join(stage_dir, n)) for n in names
               if n.endswith(".json")}
    order = ["data", "tokenizer", "codec", "codec_eval", "latents", "clap", "clap_eval", "ldm",
             "samples", "generation_eval", "controlnet", "controlnet_eval"]
    for name in sorted(records, key=lambda n: order.index(n) if n in order else len(order)):
        summary = (records[name] or {}).get("summary", {})
        parts.append(f"<h2>{html.escape(name)}</h2>{_table(summary)}")
        history = read_history(os.path.join(workdir, name))
        keys = [k for k in STAGE_CURVES.get(name, []) if any(k in r for r in history)]
        if keys:
            png = os.path.join(figures, f"{name}_loss.png")
            plots.save_curves(png, history, keys, title=f"{name} training")
            parts.append(f'<img src="{_png_uri(png)}" alt="{name} loss curves">')
    made_by = {}
    for title, rel in (EVAL_FILES if evals is None else evals).items():
        values = _load_json(os.path.join(workdir, rel))
        if values:
            made_by[title] = values.pop("provenance", {}).get("commit")
            table = _controls_table(values) if "control_inputs" in values else _table(values)
            parts.append(f"<h2>{title} metrics</h2>{table}")
    parts.append(_samples_section(workdir, figures))
    record = provenance.record()
    made = {f"{title} evaluated at": commit for title, commit in made_by.items() if commit}
    parts.append("<h2>provenance</h2>" + _table({
        "commit": record["commit"], "uncommitted changes": record["dirty"], **made,
        **{f"version/{k}": v for k, v in record["versions"].items()},
        **{f"devices/{k}": v for k, v in record["devices"].items()},
        "written": record["written"]}))
    body = "\n".join(p for p in parts if p)
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>ldm_jax report</title>"
            "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
            "table{border-collapse:collapse}td{border:1px solid #ccc;padding:2px 8px}"
            "img{max-width:100%}</style></head><body>" + body + "</body></html>")
    path = os.path.join(workdir, "report.html")
    paths.write_text(path, page)
    return path


def _samples_section(workdir: str, figures: str) -> str:
    import soundfile as sf
    index = _load_json(os.path.join(workdir, "samples", "samples.json"))
    if not index:
        return ""
    parts = ["<h2>generated samples</h2>"]
    for i, item in enumerate(index):
        wav = os.path.join(workdir, "samples", item["file"])
        if not paths.exists(wav):
            continue
        audio, sr = sf.read(io.BytesIO(paths.read_bytes(wav)) if paths.is_remote(wav) else wav,
                            dtype="float32")
        png = os.path.join(figures, f"sample_{i}.png")
        plots.save_log_mel_grid(png, [audio], [item.get("prompt", "")], sr)
        parts.append(f"<h3>{html.escape(item.get('prompt', ''))}</h3>"
                     f'<audio controls src="{_wav_uri(audio, sr)}"></audio><br>'
                     f'<img src="{_png_uri(png)}" alt="spectrogram">')
    return "\n".join(parts)
