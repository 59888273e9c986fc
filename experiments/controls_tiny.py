"""The tiny chain on clips whose controls vary: the data the controlled generators train on.

`synthetic_music` with `data.controls`: 8-second clips (4 to 10 bars) whose level follows a
crescendo, decrescendo, swell or accents, with the first beat of each bar accented, storing the
ground truth of their beats, downbeats, notes and level curve. The codec, CLAP and the U-Net are
the `tiny` chain's; the U-Net trains on whole clips (400 latent frames), 8 a step for 1600 steps
(5.1M frames seen; `tiny`: 6.1M), so that the chain stays under 20 minutes on a 2-core CPU
(2000 steps gave the same generation scores: FD 1.19 against 1.18). `controls_eval` scores the
controls extracted from the real test clips and from their codec reconstructions against the
ground truth (`codec/controls.json`): the ceiling of every controlled generator on this data.
The attribute judge (`judge`) is trained on the labels and scored on real and
codec-reconstructed test clips (`judge/eval.json`); the generation evaluation then reports
instrument adherence judged by it. Music ControlNet (`controlnet`) trains on the trained U-Net
for 800 steps on the controls extracted from the training clips; `controlnet_eval` scores its
adherence to the ground-truth controls of 32 test clips (`controlnet/eval.json`). `ditto`
configures DITTO, which needs no stage: `ldm-jax ditto` and `ldm-jax eval ditto` use the trained
chain as it is.
"""

import dataclasses

import ml_collections

from experiments import judge_tiny, tiny
from ldm_jax.controls.features import FeatureConfig


def feature_defaults() -> ml_collections.ConfigDict:
    """`FeatureConfig`'s fields (its defaults; frame_rate 0: the codec's latent frame rate)."""
    fields = {f.name: f.default for f in dataclasses.fields(FeatureConfig)
              if f.name != "sample_rate"}
    fields["frame_rate"] = 0.0
    return ml_collections.ConfigDict(fields)


def get_config(arg=None):
    del arg
    c = tiny.get_config()
    c.stages = ("data", "tokenizer", "codec", "codec_eval", "controls_eval", "judge",
                "judge_eval", "clap", "clap_eval", "latents", "ldm", "samples",
                "generation_eval", "controlnet", "controlnet_eval", "report")
    c.data.clip_seconds = 8.0
    c.data.num_train = 512
    c.data.num_test = 64
    c.data.controls = True
    # The codec: the iSTFT decoder with a per-frame phase advance and the frame-level loss in
    # place of L1 and SI-SDR (benchmarks/RESULTS.md, D7). On these clips, quiet and widely
    # levelled, the tiny transposed-convolution codec's encoder stops following its input in
    # 400 steps (every clip decodes to the same -38 dB noise: dynamics ceiling -0.01, melody
    # 0.00); this one keeps the level (ceiling: dynamics 0.70, beat F1 0.64, melody 0.10).
    c.codec.model.decoder = "istft"
    c.codec.model.istft_phase = "advance"
    c.codec.loss_weights["waveform/l1"] = 0.0
    c.codec.loss_weights["waveform/si_sdr_loss"] = 0.0
    c.codec.loss_weights["waveform/level_loss"] = 50.0
    c.controls = ml_collections.ConfigDict()
    c.controls.features = feature_defaults()
    c.controls.eval = ml_collections.ConfigDict(dict(num_examples=64, batch_size=8, seed=0))
    # The attribute judge, on 2-second crops of the training clips; it judges every generated
    # clip's instrument beside CLAP's zero-shot guess.
    c.judge = judge_tiny.get_config()
    c.judge.data.crop_seconds = 2.0
    c.judge.train.steps = 600
    tiny.share_data(c, stages=("judge",))
    # Whole clips: 400 latent frames, 8 clips a step (tiny: 100 frames, 16 clips).
    c.ldm.data.crop_seconds = 8.0
    c.ldm.generation.seconds = 8.0
    c.ldm.eval.seconds = 8.0
    c.ldm.train.batch_size = 8
    c.ldm.train.steps = 1600
    c.ldm.eval.num_prompts = 64
    c.controlnet = controlnet_config(c)
    c.ditto = ditto_config()
    return c


def ditto_config() -> ml_collections.ConfigDict:
    """DITTO (no stage: `ldm-jax ditto`, `ldm-jax eval ditto`): Adam on the initial noise for
    40 iterations through 10 DDIM steps; the evaluation optimises 2-second clips of 32 test
    clips for each task and makes 4 long-form clips of 30 s."""
    from ldm_jax.diffusion.config import DittoEvalConfig
    from ldm_jax.diffusion.ditto import DittoConfig

    return ml_collections.ConfigDict(dict(optimise=DittoConfig.config(),
                                          eval=DittoEvalConfig.config()))


def controlnet_config(c) -> ml_collections.ConfigDict:
    """The `controlnet` stage: Music ControlNet on the trained U-Net, on the controls extracted
    from the training clips, at the U-Net's crop, batch and learning rate."""
    from ldm_jax.diffusion.config import ControlEvalConfig
    from ldm_jax.diffusion.controlnet import CONTROLS, ControlMaskConfig

    cn = ml_collections.ConfigDict()
    cn.model = ml_collections.ConfigDict(dict(controls=tuple(CONTROLS),
                                              encoder_channels=(32, 64)))
    cn.masks = ControlMaskConfig.config()
    cn.features = feature_defaults()
    cn.train = ml_collections.ConfigDict(dict(
        steps=800, batch_size=8, lr=float(c.ldm.train.lr), warmup=50, ema_decay=0.999))
    cn.data = ml_collections.ConfigDict(c.ldm.data.to_dict())
    cn.mesh = ml_collections.ConfigDict(c.ldm.mesh.to_dict())
    cn.checkpoint = ml_collections.ConfigDict(c.ldm.checkpoint.to_dict())
    cn.log = ml_collections.ConfigDict(dict(c.ldm.log.to_dict(), audio_every_steps=0))
    cn.seed = 0
    # 32 clips in the chain (under its time budget); `ldm-jax eval controls --max-clips 64`
    # scores the whole test split.
    cn.eval = ControlEvalConfig.config(steps=25, num_prompts=32)
    return cn
