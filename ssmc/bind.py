"""bind: tensors handed to an op or reference → the size of every dim, or one TensorError.

Binds `batch`, `seq` and every dim from the tensors' shapes (spec values win), then
checks each tensor against its declaration, head counts, dtypes, device, `cu_seqlens`
and `initial_state`. Every problem is collected and reported together, each naming the
tensor, what was expected and what came.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ssmc import ir
from ssmc.errors import TensorError
from ssmc.expr import refs

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def size_of(size: ir.Size, dims: Mapping[str, int]) -> int:
    """A declared size as a number, given the bound dims."""
    return size if isinstance(size, int) else dims[size]


def bind(
    checked: ir.CheckedSpec,
    tensors: Mapping[str, Tensor],
    *,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    check_values: bool = True,
) -> dict[str, int]:
    """Every dim symbol (and `batch`, `seq`) bound to its size; TensorError listing all problems.

    `check_values=False` leaves out the values of `cu_seqlens` (fake tensors carry none).
    """
    spec = checked.spec
    declared = {t.name: t for t in spec.tensors}
    problems = [
        f"{name}: not a tensor of spec {spec.name} (it has {_names(spec)})"
        for name in tensors
        if name not in declared
    ]
    optional = {"initial_state": initial_state, "cu_seqlens": cu_seqlens}
    given = {**tensors, **{k: v for k, v in optional.items() if v is not None}}
    wrong = {k for k, v in given.items() if not isinstance(v, Tensor)}
    problems += [f"{k}: expected a torch.Tensor, got {_type_name(given[k])}" for k in wrong]
    tensors = {k: v for k, v in tensors.items() if k not in wrong}
    initial_state = None if "initial_state" in wrong else initial_state
    cu_seqlens = None if "cu_seqlens" in wrong else cu_seqlens
    present = [t for t in spec.tensors if t.name in tensors]
    dims = _bind_dims(spec, [(t, tensors[t.name]) for t in present])
    for t in spec.tensors:
        if t.name not in tensors and t.name not in wrong:
            problems.append(f"{t.name}: missing, expected shape {_shape_text(t.shape, dims)}")
    for t in present:
        problems += _check_tensor(t, tensors[t.name], dims)
    problems += _check_unbound(spec, dims)
    problems += _check_positive(spec, present, tensors, dims)
    if not problems:
        problems += _check_heads(checked, dims, tensors)
    problems += _check_dtypes_devices(
        spec, tensors, initial_state=initial_state, cu_seqlens=cu_seqlens
    )
    problems += _check_varlen(spec, dims, cu_seqlens, check_values=check_values)
    if not problems:
        problems += _check_initial_state(checked, dims, initial_state, cu_seqlens)
    if problems:
        raise TensorError(
            f"{len(problems)} problem(s) with the tensors for {spec.name}:\n  "
            + "\n  ".join(problems)
        )
    return dims


def offsets_problems(offsets: list[int], seq: int | None) -> list[str]:
    """The values of `cu_seqlens`: from 0, non-decreasing, to seq (O(num_seqs), host ints)."""
    problems = []
    if offsets[0] != 0:
        problems.append(f"cu_seqlens: expected to start at 0, got {offsets[0]}")
    if any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
        problems.append(f"cu_seqlens: expected non-decreasing offsets, got {_short(offsets)}")
    if seq is not None and offsets[-1] != seq:
        problems.append(f"cu_seqlens: expected to end at seq = {seq}, got {offsets[-1]}")
    return problems


def _short(values: list[int]) -> str:
    """A list as text, its middle elided past 32 values (num_seqs may be large)."""
    if len(values) <= 32:
        return str(values)
    return f"[{', '.join(map(str, values[:16]))}, …, {', '.join(map(str, values[-16:]))}]"


def _type_name(value: object) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _names(spec: ir.Spec) -> str:
    return ", ".join(t.name for t in spec.tensors)


def _bind_dims(spec: ir.Spec, given: list[tuple[ir.Tensor, Tensor]]) -> dict[str, int]:
    """Spec values first, then the first tensor of the right rank that carries each symbol."""
    dims = {d.name: d.value for d in spec.dims if d.value is not None}
    for decl, value in given:
        if value.dim() != len(decl.shape):
            continue
        for size, actual in zip(decl.shape, value.shape, strict=True):
            if isinstance(size, str) and size not in dims:
                dims[size] = int(actual)
    return dims


def _shape_text(shape: tuple[ir.Size, ...], dims: Mapping[str, int]) -> str:
    """`[batch, seq, G=1, N=128]`: symbols with their bound values (batch and seq bare)."""
    parts = []
    for size in shape:
        if isinstance(size, int) or size in (ir.BATCH, ir.SEQ) or size not in dims:
            parts.append(str(size))
        else:
            parts.append(f"{size}={dims[size]}")
    return "[" + ", ".join(parts) + "]"


def _numbers(shape: tuple[ir.Size, ...], dims: Mapping[str, int]) -> str:
    return "[" + ", ".join(str(dims.get(s, "?") if isinstance(s, str) else s) for s in shape) + "]"


def _check_tensor(decl: ir.Tensor, value: Tensor, dims: Mapping[str, int]) -> list[str]:
    """Shape of one tensor against its declaration, in the bound dims."""
    got = "[" + ", ".join(str(s) for s in value.shape) + "]"
    expected = f"{_shape_text(decl.shape, dims)} = {_numbers(decl.shape, dims)}"
    if value.dim() != len(decl.shape):
        return [
            f"{decl.name}: expected {len(decl.shape)} dims {expected}, got {value.dim()} dims {got}"
        ]
    for size, actual in zip(decl.shape, value.shape, strict=True):
        if (
            isinstance(size, int)
            and size != actual
            or isinstance(size, str)
            and dims[size] != actual
        ):
            return [f"{decl.name}: expected shape {expected}, got {got}"]
    return []


def _check_unbound(spec: ir.Spec, dims: Mapping[str, int]) -> list[str]:
    """Dims the output needs that no tensor (nor the spec) gave a size."""
    needed = [s for s in spec.output.shape if isinstance(s, str)] + [d.name for d in spec.dims]
    return [
        f"dim {name}: not bound (no tensor of the right rank carries it)"
        for name in dict.fromkeys(needed)
        if name not in dims
    ]


def _check_positive(
    spec: ir.Spec, present: list[ir.Tensor], tensors: Mapping[str, Tensor], dims: Mapping[str, int]
) -> list[str]:
    """Dims bound at call time are at least 1, like every dim a spec binds."""
    problems = []
    for d in spec.dims:
        size = dims.get(d.name)
        if d.value is None and size is not None and size < 1:
            for name in _carriers(d.name, present, tensors)[:1]:
                shape = list(tensors[name].shape)
                problems.append(
                    f"{name}: expected {d.name} of at least 1, got {d.name}={size} (shape {shape})"
                )
    return problems


def _carriers(
    symbol: ir.Size, present: list[ir.Tensor], tensors: Mapping[str, Tensor]
) -> list[str]:
    """The given tensors (of the declared rank) whose shape carries the dim `symbol`."""
    if not isinstance(symbol, str):
        return []
    return [t.name for t in present if symbol in t.shape and tensors[t.name].dim() == len(t.shape)]


def _check_heads(
    checked: ir.CheckedSpec, dims: Mapping[str, int], tensors: Mapping[str, Tensor]
) -> list[str]:
    """Every role's head count divides the output head count H; names the tensors that gave them."""
    spec, counts = checked.spec, checked.heads
    present = [t for t in spec.tensors if t.name in tensors]
    H = size_of(counts.output, dims)
    exprs = {"query": spec.query, "key": spec.key, "value": spec.value, "decay": None}
    problems = []
    for role in ("query", "key", "value", "decay"):
        count = getattr(counts, role)
        if count is None:
            continue
        G = size_of(count, dims)
        if G < 1 or H % G:
            expr = exprs[role]
            used = refs(expr) if expr is not None else frozenset()
            carriers = _carriers(count, present, tensors)
            named = [n for n in carriers if n in used] or carriers
            by = ", ".join(named) + ": " if named else ""
            h_by = _carriers(counts.output, present, tensors)
            h_text = f" (from {', '.join(h_by)})" if h_by else ""
            problems.append(
                f"{by}{role} heads: {count}={G} does not divide the output head count "
                f"{counts.output}={H}{h_text}"
            )
    return problems


def _check_dtypes_devices(
    spec: ir.Spec,
    tensors: Mapping[str, Tensor],
    *,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
) -> list[str]:
    """Floating dtypes for every tensor and the state; all on one device."""
    problems = []
    floats = dict(tensors)
    if initial_state is not None:
        floats["initial_state"] = initial_state
    for name, value in floats.items():
        if value.dtype not in FLOAT_DTYPES:
            problems.append(
                f"{name}: expected dtype float16, bfloat16, float32 or float64, got {value.dtype}"
            )
    everything = {**floats, **({"cu_seqlens": cu_seqlens} if cu_seqlens is not None else {})}
    devices = {str(v.device) for v in everything.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {v.device}" for name, v in everything.items())
        problems.append(f"tensors must be on one device, got {where}")
    if initial_state is not None and not spec.initial_state:
        problems.append(f"initial_state: spec {spec.name} does not declare `initial_state`")
    if cu_seqlens is not None and not spec.varlen:
        problems.append(f"cu_seqlens: spec {spec.name} does not declare `varlen`")
    return problems


def _check_varlen(
    spec: ir.Spec, dims: Mapping[str, int], cu_seqlens: Tensor | None, *, check_values: bool
) -> list[str]:
    """cu_seqlens: 1-D int32/int64 offsets from 0 to seq, non-decreasing, with batch 1."""
    if cu_seqlens is None or not spec.varlen:
        return []
    problems = []
    if cu_seqlens.dtype not in INDEX_DTYPES:
        problems.append(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    batch = dims.get(ir.BATCH)
    if batch is not None and batch != 1:
        problems.append(f"cu_seqlens: packed sequences need batch = 1, got batch = {batch}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        shape = list(cu_seqlens.shape)
        return problems + [f"cu_seqlens: expected shape [num_seqs + 1] (at least 2), got {shape}"]
    # The values are read on the host (one small copy); a meta tensor has none.
    if check_values and cu_seqlens.dtype in INDEX_DTYPES and cu_seqlens.device.type != "meta":
        problems += offsets_problems(cu_seqlens.tolist(), dims.get(ir.SEQ))
    return problems


def _check_initial_state(
    checked: ir.CheckedSpec,
    dims: Mapping[str, int],
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
) -> list[str]:
    """initial_state [batch or num_seqs, H, N, P]."""
    if initial_state is None or checked.state_size is None:
        return []
    if cu_seqlens is not None:
        lead, count = "num_seqs", cu_seqlens.shape[0] - 1
    else:
        lead, count = ir.BATCH, dims[ir.BATCH]
    shape: tuple[ir.Size, ...] = (checked.heads.output, checked.state_size, checked.head_dim)
    want = [count, *(size_of(s, dims) for s in shape)]
    if isinstance(checked.spec.mask, ir.MaskSum):  # a sum's terms' states, stacked along N
        want[2] *= len(checked.pieces)
    if list(initial_state.shape) != want:
        text = ", ".join(f"{s}={size_of(s, dims)}" if isinstance(s, str) else str(s) for s in shape)
        return [
            f"initial_state: expected shape [{lead}, {text}] = {want}, "
            f"got {list(initial_state.shape)}"
        ]
    return []
