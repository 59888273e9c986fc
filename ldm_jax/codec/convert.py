"""Import of official Descript Audio Codec checkpoints (`weights*.pth`) into our parameter tree.

Follows the layout written by DAC 1.0.0 (Kumar et al., 2023) through audiotools'
`BaseModel.save(package=False)`: `{"state_dict": OrderedDict, "metadata": {"kwargs": ...}}`.
Every convolution is weight-normalised (`weight_g`, `weight_v`, `bias`); PyTorch's channels-first
kernels are transposed once here to our `[width, in, out]` (Conv1d `[out, in, k]`,
ConvTranspose1d `[in, out, k]`), `g` drops its unit axes, Snake `alpha` `(1, C, 1)` becomes `[C]`.
The file is read by `pickle_io.load_pth`, which never executes code from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from ldm_jax.codec.model import CodecConfig, make_codec
from ldm_jax.codec.pickle_io import CheckpointError, load_pth

# DAC constructor arguments and our config fields of the same meaning.
_DAC_KWARGS = ("sample_rate", "encoder_dim", "encoder_rates", "latent_dim", "decoder_dim",
               "decoder_rates", "n_codebooks", "codebook_size", "codebook_dim",
               "quantizer_dropout")


def config_from_dac_kwargs(kwargs: Mapping[str, Any], source: str = "checkpoint") -> CodecConfig:
    """Our `CodecConfig` from DAC's saved constructor kwargs (`metadata["kwargs"]`).

    Args:
      kwargs: the DAC constructor arguments.
      source: the file name used in error messages.

    Returns:
      The config (quantizer `dac_rvq`; `quantizer_dropout` as a rate, `False` -> 0).
    """
    unknown = sorted(set(kwargs) - set(_DAC_KWARGS))
    if unknown:
        raise CheckpointError(f"{source} was written by a DAC version with arguments this "
                              f"importer does not know ({', '.join(unknown)}); only DAC 1.0 "
                              "checkpoints are supported")
    values = {k: kwargs[k] for k in _DAC_KWARGS if k in kwargs}
    dim = values.get("codebook_dim", 8)
    if isinstance(dim, (list, tuple)):
        if len(set(dim)) != 1:
            raise CheckpointError(f"{source} uses different codebook_dim per codebook ({dim}); "
                                  "only one shared codebook_dim is supported")
        values["codebook_dim"] = int(dim[0])
    values["quantizer_dropout"] = float(values.get("quantizer_dropout", 0.0))
    return CodecConfig(**values)


def _dac_key_map(cfg: CodecConfig) -> dict[str, tuple[tuple[str, ...], str]]:
    """DAC module prefix -> (our module path, kind) for every parametrised DAC module."""
    out: dict[str, tuple[tuple[str, ...], str]] = {}

    def residual(torch_prefix, path):
        out[f"{torch_prefix}.block.0"] = (path + ("snake_0",), "snake")
        out[f"{torch_prefix}.block.1"] = (path + ("conv_0",), "conv")
        out[f"{torch_prefix}.block.2"] = (path + ("snake_1",), "snake")
        out[f"{torch_prefix}.block.3"] = (path + ("conv_1",), "conv")

    enc = ("encoder",)
    out["encoder.block.0"] = (enc + ("conv_in",), "conv")
    n = len(cfg.encoder_rates)
    for i in range(n):
        base, path = f"encoder.block.{i + 1}.block", enc + (f"block_{i}",)
        for j in range(3):
            residual(f"{base}.{j}", path + (f"res_{j}",))
        out[f"{base}.3"] = (path + ("snake",), "snake")
        out[f"{base}.4"] = (path + ("conv",), "conv")
    out[f"encoder.block.{n + 1}"] = (enc + ("snake_out",), "snake")
    out[f"encoder.block.{n + 2}"] = (enc + ("conv_out",), "conv")

    for i in range(cfg.n_codebooks):
        base, path = f"quantizer.quantizers.{i}", ("quantizer", f"vq_{i}")
        out[f"{base}.in_proj"] = (path + ("in_proj",), "conv")
        out[f"{base}.out_proj"] = (path + ("out_proj",), "conv")
        out[f"{base}.codebook"] = (path, "codebook")

    dec = ("decoder",)
    out["decoder.model.0"] = (dec + ("conv_in",), "conv")
    m = len(cfg.decoder_rates)
    for i in range(m):
        base, path = f"decoder.model.{i + 1}.block", dec + (f"block_{i}",)
        out[f"{base}.0"] = (path + ("snake",), "snake")
        out[f"{base}.1"] = (path + ("conv_t",), "conv_transpose")
        for j in range(3):
            residual(f"{base}.{j + 2}", path + (f"res_{j}",))
    out[f"decoder.model.{m + 1}"] = (dec + ("snake_out",), "snake")
    out[f"decoder.model.{m + 2}"] = (dec + ("conv_out",), "conv")
    return out


def _convert(kind: str, name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """One DAC tensor -> (our parameter name, our layout)."""
    if kind == "snake" and name == "alpha":
        return "alpha", value.reshape(-1)
    if kind == "codebook" and name == "weight":
        return "codebook", value
    if kind in ("conv", "conv_transpose") and name == "bias":
        return "bias", value
    if kind in ("conv", "conv_transpose") and name == "weight_g":
        return "weight_g", value.reshape(-1)
    if kind == "conv" and name == "weight_v":
        return "weight_v", value.transpose(2, 1, 0)
    if kind == "conv_transpose" and name == "weight_v":
        return "weight_v", value.transpose(2, 0, 1)
    raise KeyError(name)


def convert_dac_state_dict(state_dict: Mapping[str, np.ndarray], cfg: CodecConfig,
                           source: str = "checkpoint") -> dict:
    """DAC state dict (numpy, PyTorch layouts) -> our `params` tree (float32, channels last).

    Every key must map to a parameter, every parameter must be filled, and shapes must match
    the model built from `cfg`; otherwise a `CheckpointError` names the first mismatch.

    Args:
      state_dict: `{dac_key: array}`.
      cfg: the codec config the tensors belong to.
      source: the file name used in error messages.

    Returns:
      The nested `params` dict of numpy float32 arrays.
    """
    prefixes = _dac_key_map(cfg)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in state_dict.items():
        prefix, _, name = key.rpartition(".")
        if prefix not in prefixes:
            raise CheckpointError(f"{source} has tensor {key} that this DAC config has no place "
                                  "for; the checkpoint does not match its metadata")
        path, kind = prefixes[prefix]
        try:
            ours, array = _convert(kind, name, np.asarray(value))
        except KeyError:
            raise CheckpointError(f"{source} has unexpected tensor {key}") from None
        flat[path + (ours,)] = array.astype(np.float32)

    codec = make_codec(cfg)
    x = jax.ShapeDtypeStruct((1, cfg.hop_length, cfg.channels), np.float32)
    expected = jax.eval_shape(lambda v: codec.init(jax.random.PRNGKey(0), v), x)["params"]
    for path, leaf in traverse_util.flatten_dict(nn.unbox(expected)).items():
        shape = tuple(leaf.shape)
        name = "/".join(path)
        if path not in flat:
            raise CheckpointError(f"{source} lacks the tensor for {name}; the checkpoint does "
                                  "not match its metadata")
        if flat[path].shape != shape:
            raise CheckpointError(f"{source}: {name} has shape {flat[path].shape}, the config "
                                  f"expects {shape}")
    return traverse_util.unflatten_dict(flat)


def import_dac(pth_path: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """Reads a released DAC checkpoint without torch and converts it.

    Args:
      pth_path: a `weights*.pth` file written by DAC 1.0 (`{"state_dict", "metadata"}`).

    Returns:
      `(config, params)`: the `CodecConfig` fields as a plain dict (`make_codec(config)` builds
      the model) and the nested `params` dict of float32 numpy arrays for
      `codec.apply({"params": params}, ...)`.
    """
    path = os.fspath(pth_path)
    source = os.path.basename(path)
    obj = load_pth(path)
    if not (isinstance(obj, Mapping) and "state_dict" in obj and "metadata" in obj):
        raise CheckpointError(f"{source} is not a DAC checkpoint: expected a dict with "
                              "'state_dict' and 'metadata' (as DAC's save() writes)")
    metadata = obj["metadata"]
    if not (isinstance(metadata, Mapping) and isinstance(metadata.get("kwargs"), Mapping)):
        raise CheckpointError(f"{source} has no metadata['kwargs'] describing the model")
    cfg = config_from_dac_kwargs(metadata["kwargs"], source)
    params = convert_dac_state_dict(obj["state_dict"], cfg, source)
    return cfg.to_dict(), params
