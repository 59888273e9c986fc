"""The names of the device mesh's axes, and the logical names of every parameter's axes.

`data` and `fsdp` split the batch; `fsdp` also splits parameters (ZeRO-3 style) and `tensor`
splits them Megatron-style. Models never name mesh axes for their parameters: each parameter is
created with `nn.with_logical_partitioning`, naming each of its axes from `LOGICAL` below (a name
says what the axis *is*, not where it goes), and `ldm_jax.parallel.LOGICAL_RULES` maps those
names to mesh axes. A new model reuses these names; a new kind of axis gets a name here and a
rule there.
"""

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL = {
    # Widths of transformers and attention.
    "embed": "the residual width of a transformer (and of a layer's input or output beside it)",
    "context": "the features of the states a cross-attention reads (text states)",
    "heads": "heads x head width, the output of a query/key/value projection",
    "mlp": "the hidden width of a transformer's feed-forward block",
    "joint": "the width of a shared text-audio embedding space",
    "vocab": "the rows of a token table",
    "position": "the rows of a learned position table",
    # Convolutions.
    "conv_width": "the taps of a convolution kernel (time, or time and frequency)",
    "conv_in": "the input channels of a convolution or a per-frame projection",
    "conv_out": "the output channels of one, and per-channel vectors (bias, norm, activation)",
    # Quantisers.
    "codebook_entries": "the entries of a codebook",
    "codebook_dim": "the width of a codebook vector",
    # Classifiers.
    "classes": "the outputs of a classification head",
    # Conditioning vectors, one per example (timestep, pooled text).
    "cond_embed": "the features of a per-example conditioning vector",
    "cond_in": "those features where a projection to per-channel scales and shifts reads them",
}
