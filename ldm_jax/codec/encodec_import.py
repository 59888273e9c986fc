"""Import of EnCodec checkpoints (`encodec_24khz-*.th`, `encodec_48khz-*.th`) into our codec.

Défossez et al., "High Fidelity Neural Audio Compression" (2022), package `encodec` 0.1.1. A
released file is a bare `torch.save(model.state_dict())`: the weights say the layer shapes but
not the sample rate, the causality or the bandwidths, so the layout is read from the shapes
(`detect_layout`) and matched against the released models (`RELEASES`); any other model needs
its constructor arguments (`config_from_encodec_kwargs`, the form of the reference fixture's
`tiny_config.json`). Tensors are moved once into our channels-last layouts: conv kernels
`[out, in, k]` -> `[k, in, out]`, transposed-conv kernels `[in, out, k]` -> `[k, in, out]`,
weight-norm `g` without its unit axes, LSTM matrices `[4H, I]` -> `[I, 4H]`, GroupNorm
`weight` -> `scale`; the EMA codebooks (`embed`, `embed_avg`, `cluster_size`, buffers in
EnCodec) go to the `codebook_stats` collection. The file is read by `pickle_io.load_pth`, which
never executes code from it.

Parity with the PyTorch implementation is tested on a tiny causal weight-norm model (codes
identical, audio within 1e-4); for the released layouts only the key and shape coverage is
tested (their manifests hold no weights), so the 48 kHz model's numerics (GroupNorm, non-causal
padding, normalisation) are unverified against PyTorch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from ldm_jax.codec.model import CodecConfig, make_codec
from ldm_jax.codec.pickle_io import CheckpointError, load_pth
from ldm_jax.codec.quantize import STATS

# EnCodec's constructor defaults (SEANetEncoder / SEANetDecoder, ResidualVectorQuantizer,
# EncodecModel), for the arguments a config leaves out.
_SEANET_DEFAULTS = dict(
    channels=1, dimension=128, n_filters=32, n_residual_layers=1, ratios=[8, 5, 4, 2],
    activation="ELU", activation_params={"alpha": 1.0}, norm="weight_norm", norm_params={},
    kernel_size=7, last_kernel_size=7, residual_kernel_size=3, dilation_base=2, causal=False,
    pad_mode="reflect", true_skip=False, compress=2, lstm=2)
_DECODER_DEFAULTS = dict(_SEANET_DEFAULTS, final_activation=None, final_activation_params=None,
                         trim_right_ratio=1.0)
_QUANTIZER_DEFAULTS = dict(dimension=256, n_q=8, bins=1024, decay=0.99, kmeans_init=True,
                           kmeans_iters=50, threshold_ema_dead_code=2)
_MODEL_DEFAULTS = dict(normalize=False, segment=None, overlap=0.01, name="unset")
_MODEL_REQUIRED = ("target_bandwidths", "sample_rate", "channels")
# Arguments both SEANet halves must agree on for our one set of seanet_* fields.
_SHARED = ("channels", "dimension", "n_filters", "n_residual_layers", "ratios", "activation",
           "activation_params", "norm", "norm_params", "kernel_size", "last_kernel_size",
           "residual_kernel_size", "dilation_base", "causal", "pad_mode", "true_skip",
           "compress", "lstm")


def _release(sample_rate, channels, causal, norm, normalize, segment, bandwidths, n_q):
    seanet = dict(channels=channels, norm=norm, causal=causal)
    return {"seanet_encoder": seanet, "seanet_decoder": seanet,
            "quantizer": dict(dimension=128, n_q=n_q, bins=1024),
            "model": dict(target_bandwidths=bandwidths, sample_rate=sample_rate,
                          channels=channels, normalize=normalize, segment=segment)}


# `EncodecModel.encodec_model_24khz()` and `encodec_model_48khz()`: n_q is what `_get_model`
# derives from the largest bandwidth (24 kbps at 75 and 150 frames per second, 10 bits each).
RELEASES: dict[str, dict[str, Any]] = {
    "encodec_24khz": _release(24000, 1, True, "weight_norm", False, None,
                              [1.5, 3.0, 6.0, 12.0, 24.0], 32),
    "encodec_48khz": _release(48000, 2, False, "time_group_norm", True, 1.0,
                              [3.0, 6.0, 12.0, 24.0], 16),
}


def config_from_encodec_kwargs(kwargs: Mapping[str, Any],
                               source: str = "config") -> CodecConfig:
    """Our `CodecConfig` from EnCodec's constructor arguments.

    Args:
      kwargs: `{"seanet_encoder": ..., "seanet_decoder": ..., "quantizer": ..., "model": ...}`,
        the keyword arguments of `SEANetEncoder`, `SEANetDecoder`, `ResidualVectorQuantizer` and
        `EncodecModel` (missing ones take EnCodec's defaults; other top-level keys are ignored).
      source: the name used in error messages.

    Returns:
      The config (`architecture="seanet"`, `quantizer="ema_rvq"`).
    """
    parts = {}
    for name, defaults in (("seanet_encoder", _SEANET_DEFAULTS),
                           ("seanet_decoder", _DECODER_DEFAULTS),
                           ("quantizer", _QUANTIZER_DEFAULTS), ("model", _MODEL_DEFAULTS)):
        given = kwargs.get(name)
        if not isinstance(given, Mapping):
            raise CheckpointError(f"{source} has no {name!r} arguments; give EnCodec's "
                                  "constructor arguments as seanet_encoder, seanet_decoder, "
                                  "quantizer and model")
        unknown = sorted(set(given) - set(defaults) - set(_MODEL_REQUIRED if name == "model"
                                                          else ()))
        if unknown:
            raise CheckpointError(f"{source}: {name} has arguments EnCodec 0.1.1 does not take "
                                  f"({', '.join(unknown)})")
        parts[name] = {**defaults, **given}
    enc, dec, q, m = (parts[n] for n in ("seanet_encoder", "seanet_decoder", "quantizer",
                                         "model"))
    differ = [k for k in _SHARED if enc[k] != dec[k]]
    if differ:
        raise CheckpointError(f"{source}: the encoder and decoder differ in {', '.join(differ)}; "
                              "only matching SEANet halves are supported")
    if enc["activation"] != "ELU" or dict(enc["activation_params"]) != {"alpha": 1.0}:
        raise CheckpointError(f"{source} uses activation {enc['activation']} "
                              f"{enc['activation_params']}; only ELU(alpha=1) is supported")
    if enc["norm_params"] or dec["final_activation"] is not None:
        raise CheckpointError(f"{source} sets norm_params or a final_activation; only EnCodec's "
                              "released settings (none) are supported")
    if q["dimension"] != enc["dimension"] or m["channels"] != enc["channels"]:
        raise CheckpointError(f"{source}: quantizer dimension {q['dimension']} or model channels "
                              f"{m['channels']} differ from the encoder's ({enc['dimension']}, "
                              f"{enc['channels']})")
    if enc["pad_mode"] not in ("reflect", "constant"):
        raise CheckpointError(f"{source} pads with {enc['pad_mode']!r}; only 'reflect' and "
                              "'constant' are supported")
    ratios = [int(r) for r in enc["ratios"]]
    try:
        return CodecConfig(
            architecture="seanet", sample_rate=int(m["sample_rate"]), channels=int(m["channels"]),
            encoder_dim=int(enc["n_filters"]), encoder_rates=tuple(reversed(ratios)),
            latent_dim=int(enc["dimension"]),
            decoder_dim=int(enc["n_filters"]) * 2 ** len(ratios), decoder_rates=tuple(ratios),
            n_codebooks=int(q["n_q"]), codebook_size=int(q["bins"]),
            codebook_dim=int(q["dimension"]), quantizer="ema_rvq", ema_decay=float(q["decay"]),
            dead_code_threshold=float(q["threshold_ema_dead_code"]),
            causal=bool(enc["causal"]), seanet_residual_layers=int(enc["n_residual_layers"]),
            seanet_lstm_layers=int(enc["lstm"]), seanet_kernel_size=int(enc["kernel_size"]),
            seanet_last_kernel_size=int(enc["last_kernel_size"]),
            seanet_residual_kernel_size=int(enc["residual_kernel_size"]),
            seanet_dilation_base=int(enc["dilation_base"]),
            seanet_compress=int(enc["compress"]), seanet_true_skip=bool(enc["true_skip"]),
            seanet_norm=str(enc["norm"]), seanet_pad_mode=str(enc["pad_mode"]),
            seanet_trim_right_ratio=float(dec["trim_right_ratio"]),
            normalize=bool(m["normalize"]), segment_seconds=float(m["segment"] or 0.0),
            segment_overlap=float(m["overlap"]),
            target_bandwidths=tuple(float(b) for b in m["target_bandwidths"]))
    except KeyError as e:
        raise CheckpointError(f"{source}: model has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source} does not describe a codec we can build: {e}") from None


# ----------------------------------------------------------------------------------------------
# Layout of a state dict.

_TOP = re.compile(r"(encoder|decoder)\.model\.(\d+)\.(conv|convtr)\.(conv|convtr)\."
                  r"(weight_v|weight)$")
_RES = re.compile(r"(encoder|decoder)\.model\.(\d+)\.block\.1\.conv\.conv\.(weight_v|weight)$")
_LSTM = re.compile(r"(encoder|decoder)\.model\.(\d+)\.lstm\.weight_ih_l(\d+)$")
_CODEBOOK = re.compile(r"quantizer\.vq\.layers\.(\d+)\._codebook\.embed$")


def detect_layout(state_dict: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict:
    """The SEANet and quantizer arguments that an EnCodec state dict's shapes show.

    Args:
      state_dict: `{key: array}` as EnCodec's `state_dict()`.
      source: the file name used in error messages.

    Returns:
      `{"seanet": {...}, "quantizer": {...}}` in EnCodec's argument names: channels, n_filters,
      ratios (decoder order), dimension, norm, kernel sizes, compress, n_residual_layers, lstm,
      true_skip; n_q and bins. What the weights do not hold (sample rate, causality, padding,
      dilation base, bandwidths) is not in it.
    """
    if "encoder.model.0.conv.conv.weight_v" in state_dict:
        norm = "weight_norm"
    elif "encoder.model.0.conv.norm.weight" in state_dict:
        norm = "time_group_norm"
    elif "encoder.model.0.conv.conv.weight" in state_dict:
        norm = "none"
    else:
        raise CheckpointError(f"{source} is not an EnCodec state dict: it has no "
                              "encoder.model.0.conv.conv weights")
    shape = lambda k: tuple(np.shape(state_dict[k]))
    tops = {"encoder": [], "decoder": []}
    for key in state_dict:
        match = _TOP.match(key)
        if match:
            tops[match.group(1)].append((int(match.group(2)), shape(key)))
    for half in tops.values():
        half.sort()
    enc, dec = tops["encoder"], tops["decoder"]
    if len(enc) < 2 or len(dec) < 2:
        raise CheckpointError(f"{source} is not an EnCodec state dict: it lacks the encoder's "
                              "or decoder's convolutions")
    res = sorted({int(m.group(2)) for k in state_dict if (m := _RES.match(k))
                  and m.group(1) == "encoder"})
    lstm = [k for k in state_dict if (m := _LSTM.match(k)) and m.group(1) == "encoder"]
    codebooks = sorted((int(m.group(1)), shape(k)) for k in state_dict
                       if (m := _CODEBOOK.match(k)))
    if not codebooks:
        raise CheckpointError(f"{source} has no quantizer codebooks "
                              "(quantizer.vq.layers.N._codebook.embed)")
    down = enc[1:-1]
    # Decoder transposed convs store [in, out, k]; their stride is k / 2.
    ratios = [s[2] // 2 for i, s in dec[1:-1]]
    layout = dict(
        channels=enc[0][1][1], n_filters=enc[0][1][0], kernel_size=enc[0][1][2],
        dimension=enc[-1][1][0], last_kernel_size=enc[-1][1][2], norm=norm,
        ratios=ratios, n_residual_layers=len(res) // max(len(down), 1), lstm=len(lstm))
    if res:
        first = shape(next(k for k in state_dict if (m := _RES.match(k))
                           and m.group(1) == "encoder" and int(m.group(2)) == res[0]))
        layout.update(residual_kernel_size=first[2], compress=max(first[1] // first[0], 1),
                      true_skip=not any(k.startswith("encoder.") and ".shortcut." in k
                                        for k in state_dict))
    return {"seanet": layout,
            "quantizer": dict(n_q=len(codebooks), bins=codebooks[0][1][0],
                              dimension=codebooks[0][1][1])}


def _signature(cfg: CodecConfig) -> dict:
    """What `detect_layout` can see of a config."""
    seanet = dict(channels=cfg.channels, n_filters=cfg.encoder_dim,
                  kernel_size=cfg.seanet_kernel_size, dimension=cfg.resolved_latent_dim,
                  last_kernel_size=cfg.seanet_last_kernel_size, norm=cfg.seanet_norm,
                  ratios=list(cfg.decoder_rates),
                  n_residual_layers=cfg.seanet_residual_layers, lstm=cfg.seanet_lstm_layers)
    if cfg.seanet_residual_layers:
        seanet.update(residual_kernel_size=cfg.seanet_residual_kernel_size,
                      compress=cfg.seanet_compress, true_skip=cfg.seanet_true_skip)
    return {"seanet": seanet, "quantizer": dict(n_q=cfg.n_codebooks, bins=cfg.codebook_size,
                                                dimension=cfg.codebook_dim)}


def _describe(layout: dict) -> str:
    s, q = layout["seanet"], layout["quantizer"]
    return (f"{s['channels']} channel(s), {s['norm']}, n_filters {s['n_filters']}, ratios "
            f"{s['ratios']}, dimension {s['dimension']}, {q['n_q']} codebooks of {q['bins']}")


def config_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           source: str = "checkpoint") -> tuple[str, CodecConfig]:
    """`(release name, config)` of the released EnCodec model whose layout the weights have."""
    layout = detect_layout(state_dict, source)
    for name, kwargs in RELEASES.items():
        cfg = config_from_encodec_kwargs(kwargs, name)
        if _signature(cfg) == layout:
            return name, cfg
    raise CheckpointError(f"{source} has an EnCodec layout that is not a released model "
                          f"({_describe(layout)}); pass --config JSON with its constructor "
                          "arguments (seanet_encoder, seanet_decoder, quantizer, model)")


# ----------------------------------------------------------------------------------------------
# Conversion.


def encodec_key_map(cfg: CodecConfig) -> dict[str, tuple[str, tuple[str, ...], str]]:
    """EnCodec module prefix -> (collection, our module path, kind) for every module with
    tensors: kinds `conv`, `convtr`, `lstm`, `codebook`."""
    out: dict[str, tuple[str, tuple[str, ...], str]] = {}
    n_res = cfg.seanet_residual_layers

    def resblock(prefix, path):
        out[f"{prefix}.block.1"] = ("params", path + ("conv_0",), "conv")
        out[f"{prefix}.block.3"] = ("params", path + ("conv_1",), "conv")
        if not cfg.seanet_true_skip:
            out[f"{prefix}.shortcut"] = ("params", path + ("shortcut",), "conv")

    enc = ("encoder",)
    out["encoder.model.0"] = ("params", enc + ("conv_in",), "conv")
    idx = 1
    for i in range(len(cfg.encoder_rates)):
        for j in range(n_res):
            resblock(f"encoder.model.{idx}", enc + (f"block_{i}_res_{j}",))
            idx += 1
        out[f"encoder.model.{idx + 1}"] = ("params", enc + (f"block_{i}_down",), "conv")
        idx += 2  # the ELU, then the strided conv
    if cfg.seanet_lstm_layers:
        out[f"encoder.model.{idx}"] = ("params", enc + ("lstm",), "lstm")
        idx += 1
    out[f"encoder.model.{idx + 1}"] = ("params", enc + ("conv_out",), "conv")

    for i in range(cfg.n_codebooks):
        out[f"quantizer.vq.layers.{i}._codebook"] = (STATS, ("quantizer", f"vq_{i}"),
                                                      "codebook")

    dec = ("decoder",)
    out["decoder.model.0"] = ("params", dec + ("conv_in",), "conv")
    idx = 1
    if cfg.seanet_lstm_layers:
        out["decoder.model.1"] = ("params", dec + ("lstm",), "lstm")
        idx = 2
    for i in range(len(cfg.decoder_rates)):
        out[f"decoder.model.{idx + 1}"] = ("params", dec + (f"block_{i}_up",), "convtr")
        idx += 2
        for j in range(n_res):
            resblock(f"decoder.model.{idx}", dec + (f"block_{i}_res_{j}",))
            idx += 1
    out[f"decoder.model.{idx + 1}"] = ("params", dec + ("conv_out",), "conv")
    return out


_SUFFIXES = {
    "conv": ("conv.conv.weight_v", "conv.conv.weight_g", "conv.conv.weight", "conv.conv.bias",
             "conv.norm.weight", "conv.norm.bias"),
    "convtr": ("convtr.convtr.weight_v", "convtr.convtr.weight_g", "convtr.convtr.weight",
               "convtr.convtr.bias", "convtr.norm.weight", "convtr.norm.bias"),
    "codebook": ("inited", "cluster_size", "embed", "embed_avg"),
}
_LSTM_TENSOR = re.compile(r"lstm\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)$")


def _split_key(key: str, prefixes: Mapping[str, Any]) -> tuple[str, str] | None:
    """`(module prefix, tensor suffix)` of a state-dict key, or None."""
    for kind, suffixes in _SUFFIXES.items():
        for suffix in suffixes:
            prefix = key[:-len(suffix) - 1]
            if key.endswith("." + suffix) and prefixes.get(prefix, (0, 0, None))[2] == kind:
                return prefix, suffix
    match = _LSTM_TENSOR.search(key)
    if match:
        prefix = key[:match.start() - 1]
        if prefixes.get(prefix, (0, 0, None))[2] == "lstm":
            return prefix, match.group(0)
    return None


def _convert(kind: str, suffix: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """One EnCodec tensor -> (our name under the module, our layout)."""
    layer, _, name = suffix.rpartition(".")
    if kind == "lstm":
        match = _LSTM_TENSOR.match(suffix)
        which, k = match.group(1), match.group(2)
        kernel = which.startswith("weight")
        ours = f"layer_{k}_{'kernel' if kernel else 'bias'}_{which.split('_')[1]}"
        return (ours,), value.T if kernel else value
    if kind == "codebook":
        return (suffix,), value
    if layer.endswith(".norm"):
        return ("norm", "scale" if name == "weight" else "bias"), value
    if name == "bias":
        return ("conv", "bias"), value
    if name == "weight_g":
        return ("conv", "weight_g"), value.reshape(-1)
    ours = "weight_v" if name == "weight_v" else "kernel"
    # Conv1d stores [out, in, k]; ConvTranspose1d [in, out, k]. Ours are both [k, in, out].
    return ("conv", ours), value.transpose(2, 1, 0) if kind == "conv" else value.transpose(2, 0, 1)


def expected_variables(cfg: CodecConfig) -> dict:
    """The shapes of the codec's `params` and `codebook_stats` (`jax.eval_shape`, no weights)."""
    codec = make_codec(cfg)
    x = jax.ShapeDtypeStruct((1, cfg.hop_length, cfg.channels), np.float32)
    return nn.unbox(jax.eval_shape(lambda v: codec.init(jax.random.PRNGKey(0), v), x))


def convert_encodec_state_dict(state_dict: Mapping[str, np.ndarray], cfg: CodecConfig,
                               source: str = "checkpoint") -> tuple[dict, dict]:
    """EnCodec state dict (numpy, PyTorch layouts) -> our `(params, codebook_stats)`.

    Every key must map to a variable, every variable must be filled, and shapes must match the
    model built from `cfg`; otherwise a `CheckpointError` names the first mismatch. Every
    codebook must have been initialised (`inited` = 1: EnCodec fills codebooks by k-means on
    the first training batch).

    Args:
      state_dict: `{encodec_key: array}`.
      cfg: the codec config the tensors belong to.
      source: the file name used in error messages.

    Returns:
      `(params, stats)`: nested dicts of float32 numpy arrays for
      `codec.apply({"params": params, "codebook_stats": stats}, ...)`.
    """
    prefixes = encodec_key_map(cfg)
    flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, STATS: {}}
    for key, value in state_dict.items():
        split = _split_key(key, prefixes)
        if split is None:
            raise CheckpointError(f"{source} has tensor {key} that this EnCodec config has no "
                                  "place for; the checkpoint does not match the config")
        prefix, suffix = split
        collection, path, kind = prefixes[prefix]
        value = np.asarray(value)
        if kind == "codebook" and suffix == "inited":
            if not np.all(value):
                raise CheckpointError(f"{source}: codebook {prefix} was never initialised "
                                      "(inited = 0); train the model before importing it")
            continue
        ours, array = _convert(kind, suffix, value)
        flat[collection][path + ours] = np.asarray(array, np.float32)

    expected = expected_variables(cfg)
    for collection in ("params", STATS):
        for path, leaf in traverse_util.flatten_dict(expected[collection]).items():
            name = "/".join(path)
            if path not in flat[collection]:
                raise CheckpointError(f"{source} lacks the tensor for {name}; the checkpoint does "
                                      "not match the config")
            if flat[collection][path].shape != tuple(leaf.shape):
                raise CheckpointError(f"{source}: {name} has shape "
                                      f"{flat[collection][path].shape}, the config expects "
                                      f"{tuple(leaf.shape)}")
    return (traverse_util.unflatten_dict(flat["params"]),
            traverse_util.unflatten_dict(flat[STATS]))


def read_encodec_config(path: str | os.PathLike) -> dict:
    """EnCodec constructor arguments from a JSON file (`tiny_config.json`'s form)."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            kwargs = json.load(f)
    except OSError as e:
        raise CheckpointError(f"cannot read the EnCodec config {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not JSON: {e}") from None
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{path} must hold a JSON object of EnCodec constructor arguments")
    return kwargs


def import_encodec(th_path: str | os.PathLike, config: Mapping[str, Any] | str | None = None
                   ) -> tuple[dict[str, Any], dict, dict]:
    """Reads an EnCodec checkpoint without torch and converts it.

    Args:
      th_path: a `torch.save(model.state_dict())` file, e.g. `encodec_24khz-d7cc33bc.th`.
      config: EnCodec's constructor arguments (a dict or a JSON file, see
        `config_from_encodec_kwargs`); None: the released model the shapes match.

    Returns:
      `(config, params, stats)`: the `CodecConfig` fields as a plain dict, the `params` and the
      `codebook_stats` of the codec (nested dicts of float32 numpy arrays).
    """
    path = os.fspath(th_path)
    source = os.path.basename(path)
    state_dict = load_pth(path)
    if not (isinstance(state_dict, Mapping) and state_dict
            and all(isinstance(v, np.ndarray) for v in state_dict.values())):
        raise CheckpointError(f"{source} is not an EnCodec checkpoint: expected a state dict "
                              "of tensors (as torch.save(model.state_dict()) writes)")
    if config is None:
        _, cfg = config_from_state_dict(state_dict, source)
    else:
        name = "config"
        if isinstance(config, (str, os.PathLike)):
            name, config = os.path.basename(os.fspath(config)), read_encodec_config(config)
        cfg = config_from_encodec_kwargs(config, name)
        layout = detect_layout(state_dict, source)
        if _signature(cfg) != layout:
            raise CheckpointError(f"{source} does not match {name}: the weights have "
                                  f"{_describe(layout)}, the config "
                                  f"{_describe(_signature(cfg))}")
    params, stats = convert_encodec_state_dict(state_dict, cfg, source)
    return cfg.to_dict(), params, stats
