"""The names of the device mesh's axes, which every layer may refer to.

`data` and `fsdp` split the batch; `fsdp` also splits parameters (ZeRO-3 style) and `tensor`
splits them Megatron-style. `parallel` builds the mesh and holds the rules that place arrays on
these axes; code below it (the DSP transforms, the models) only names them.
"""

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
