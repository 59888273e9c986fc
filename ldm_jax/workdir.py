"""Where a run's files live: the workdir layout that the chain, the commands and the trainers share.

  W/config.json  W/data/  W/tokenizer/spm.model  W/codec/  W/latents/  W/clap/  W/ldm/
  W/samples/  W/stages/  W/logs/STAGE/ (TensorBoard)  W/report.html

`Layout` names these paths once. The data directory and the tokenizer may live elsewhere
(`data.data_dir`, `tokenizer.path`, or a command's `--data-dir` / `--tokenizer`), and a stage's
inputs may be given explicitly (`ldm-jax train ldm --latents DIR --clap DIR`); everything else is
under W. Every stage's `train(cfg, layout)` reads and writes through it.
"""

from __future__ import annotations

import dataclasses
import os

from ldm_jax import paths


@dataclasses.dataclass(frozen=True)
class Layout:
    """The paths of one workdir (all absolute or URLs).

    Attributes:
      root: W.
      data_dir: the TFDS data directory of the source dataset (W/data by default).
      tokenizer: the SentencePiece model (W/tokenizer/spm.model by default).
      inputs: explicit directories of a stage's inputs, by stage name ("latents", "clap", ...),
        used instead of W/NAME.
    """

    root: str
    data_dir: str
    tokenizer: str
    inputs: tuple[tuple[str, str], ...] = ()

    def stage(self, name: str) -> str:
        """The output directory of stage NAME (an explicit input directory where given)."""
        return dict(self.inputs).get(name) or os.path.join(self.root, name)

    def logs(self, name: str) -> str:
        """TensorBoard directory of stage NAME."""
        return os.path.join(self.root, "logs", name)

    def record(self, name: str) -> str:
        """The chain's record of stage NAME (its config and summary)."""
        return os.path.join(self.root, "stages", f"{name}.json")

    @property
    def config(self) -> str:
        return os.path.join(self.root, "config.json")

    @property
    def report(self) -> str:
        return os.path.join(self.root, "report.html")


def layout(cfg, workdir: str, *, data_dir: str | None = None, tokenizer: str | None = None,
           **inputs: str | None) -> Layout:
    """The layout of WORKDIR for experiment CFG (a chain or a stage config).

    Args:
      cfg: its `data.data_dir` and `tokenizer.path`, where set, place the data and tokenizer.
      workdir: W.
      data_dir, tokenizer: explicit locations, which win over the config's.
      inputs: explicit input directories by stage name (None: under W).
    """
    root = paths.resolve(workdir)
    data = cfg.get("data", None) or {}
    tok = cfg.get("tokenizer", None) or {}
    return Layout(
        root=root,
        data_dir=paths.resolve(data_dir or data.get("data_dir") or os.path.join(root, "data")),
        tokenizer=tokenizer or tok.get("path") or os.path.join(root, "tokenizer", "spm.model"),
        inputs=tuple((k, paths.resolve(v)) for k, v in inputs.items() if v))
