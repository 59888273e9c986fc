"""Collectives of a compiled XLA program: what a sharded train step sends between devices.

Reads the optimised HLO text of a compiled JAX function (`jax.jit(f).lower(...).compile()
.as_text()`) and lists every all-gather, all-reduce, reduce-scatter, all-to-all and
collective-permute (and their asynchronous `-start` forms) with the shapes it moves, so that
the benchmarks can report collective bytes per step and the tests can check that FSDP gathers
parameters, not activations (the GSPMD partitioner of Xu et al. 2021 inserts these ops).

    compiled = jax.jit(step, in_shardings=..., out_shardings=...).lower(*args).compile()
    ops = collectives(compiled.as_text())
    print(summary(ops))

One entry per array: a variadic op (XLA's all-reduce combiner fuses many gradients into one
tuple-shaped all-reduce) gives one entry per operand, all with the op's `name`. `bytes` is the
size of the full array the op assembles or reduces: the output of an all-gather, the input of a
reduce-scatter, the operand of the others. An op inside a loop body is listed once, however
many times the loop runs.
"""

from __future__ import annotations

import math
import re

OPS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s"
    r"(?P<op>" + "|".join(OPS) + r")(?P<start>-start)?\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b(pred|bf16|f8e\w+|[fsu]\d+|c64|c128)\[([\d,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{\{")
_DIMENSIONS = re.compile(r"dimensions=\{(\d+)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _arrays(text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(_COMMENT.sub("", text))]


def _split_call(rest: str) -> tuple[str, str]:
    """'operands), attrs' -> ('operands', 'attrs'), by matching the op's parenthesis."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[:i], rest[i + 1:]
    return rest, ""


def _count_operands(operand_text: str) -> int:
    depth, count = 0, 1 if operand_text.strip() else 0
    for ch in operand_text:
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        count += ch == "," and depth == 0
    return count


def _group_size(attrs: str) -> int | None:
    """Devices per replica group, from any of the three ways HLO prints the groups:
    `[groups,size]<=[...]`, `{{0,1,...},...}` or `mesh['axis_0'=4,...] {'axis_0'}`."""
    m = _MESH_GROUPS.search(attrs)
    if m:
        sizes = {name: int(n) for name, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes.get(name, 1) for name in re.findall(r"'([^']+)'", m.group(2)))
    m = _IOTA_GROUPS.search(attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = _LIST_GROUPS.search(attrs)
    if m:
        return len([d for d in m.group(1).split(",") if d])
    if _PAIRS.search(attrs):
        return 2
    return None


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    size = DTYPE_BYTES.get(dtype, 1)  # fp8 types are one byte
    return size * math.prod(shape)


def collectives(hlo_text: str) -> list[dict]:
    """Every collective of an HLO module, one entry per array it moves.

    Args:
      hlo_text: HLO text, e.g. `compiled.as_text()` of a jitted, sharded function.

    Returns:
      A list of {"name": instruction name, "op": one of OPS, "shape": output shape (tuple),
      "dtype": e.g. "f32", "operand_shape": input shape (tuple), "bytes": bytes of the full
      array (see the module docstring), "group_size": devices taking part in each group, or None
      when the HLO does not say, "source": the JAX operation it serves (the `op_name` of its
      metadata, e.g. "jit(step)/jvp(UNet)/mid_attn/..."; empty without metadata)}, in program
      order.
    """
    out = []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        op, name = m.group("op"), m.group("name")
        operand_text, attrs = _split_call(m.group("rest"))
        # Optimised HLO names its operands without their types; hand-written HLO may type them.
        typed = _arrays(operand_text)
        count = len(typed) or _count_operands(operand_text)
        results = _arrays(m.group("type"))
        if m.group("start") and op in ("all-gather", "collective-permute"):
            # Async starts return (operands..., outputs..., [context scalars]).
            results = results[count:2 * count]
        group = _group_size(attrs)
        dim = _DIMENSIONS.search(attrs)
        source = _OP_NAME.search(attrs)
        for i, (dtype, shape) in enumerate(results):
            in_shape = typed[i][1] if i < len(typed) else _operand_shape(op, shape, group, dim)
            full = shape if op == "all-gather" else in_shape
            out.append({"name": name, "op": op, "shape": shape, "dtype": dtype,
                        "operand_shape": in_shape, "bytes": _nbytes(dtype, full),
                        "group_size": group, "source": source.group(1) if source else ""})
    return out


def _operand_shape(op: str, shape: tuple[int, ...], group: int | None, dim) -> tuple[int, ...]:
    """The input shape of a collective from its output (gathered or scattered along `dim`)."""
    if op not in ("all-gather", "reduce-scatter") or not group or dim is None:
        return shape
    d = int(dim.group(1))
    scaled = shape[d] // group if op == "all-gather" else shape[d] * group
    return shape[:d] + (scaled,) + shape[d + 1:]


def traffic_bytes(entry: dict) -> float:
    """Bytes each device sends for one entry with ring algorithms (0 if the group is unknown).

    All-reduce: 2 (n - 1) / n of the array; all-gather and reduce-scatter: (n - 1) / n of the
    full array; all-to-all: (n - 1) / n of the operand; collective-permute: the operand.
    """
    n = entry["group_size"]
    if not n:
        return 0.0
    share = (n - 1) / n
    factor = {"all-reduce": 2 * share, "all-gather": share, "reduce-scatter": share,
              "all-to-all": share, "collective-permute": 1.0}[entry["op"]]
    return factor * entry["bytes"]


def summary(entries: list[dict]) -> dict:
    """Totals per op kind and overall.

    Args:
      entries: from `collectives`.

    Returns:
      {op: {"ops": instructions, "arrays": entries, "bytes": sum of `bytes`,
            "traffic_bytes": sum of `traffic_bytes`}} for each op present, plus "total".
    """
    out: dict[str, dict] = {}
    for key in [e["op"] for e in entries] + ["total"]:
        out.setdefault(key, {"ops": set(), "arrays": 0, "bytes": 0, "traffic_bytes": 0.0})
    for e in entries:
        for key in (e["op"], "total"):
            row = out[key]
            row["ops"].add(e["name"])
            row["arrays"] += 1
            row["bytes"] += e["bytes"]
            row["traffic_bytes"] += traffic_bytes(e)
    for row in out.values():
        row["ops"] = len(row["ops"])
    return out
