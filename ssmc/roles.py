"""The elementwise stages of a spec: which core input comes from which role expression.

`prologue(checked)` lays out the kernels that compute the core's inputs (log a, X̄'s scale
s, materialised X̄, B, C, a Toeplitz or LTI kernel) from the spec's expressions, and says
which core inputs are declared tensors passed through unchanged; `epilogue(checked)` is
the kernel of out = (y + skip) * gate. `prologue_backward` / `epilogue_backward` are their
gradients: per forward kernel, one backward kernel over the same iteration space
(ssmc.elementwise.backward_kernel). ssmc.render hands all of them to the templates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ssmc import expr as E
from ssmc import ir
from ssmc.axes import expr_axes
from ssmc.elementwise import (
    Backward,
    Elementwise,
    Extra,
    Target,
    TileEpilogue,
    backward_kernel,
    elementwise,
    tile_epilogue,
)
from ssmc.expr_triton import identifier


@dataclass(frozen=True, slots=True, kw_only=True)
class Prologue:
    """The elementwise kernels of the prologue and how each core input is obtained."""

    kernels: tuple[Elementwise, ...]
    core: dict[str, str]
    """Core input role → the launcher's Python expression for it."""
    lti: dict[str, str] | None
    targets: tuple[Target, ...] = ()
    """The roles computed from expressions (materialised), in kernel order."""
    passthrough: dict[str, int] = dataclasses.field(default_factory=dict)
    """Role that is a declared tensor passed through unchanged → the tensor's position."""
    fused_decay: Elementwise | None = None
    """log a of a diagonal decay computed from an expression: the kernel the chunked forward's
    cumsum evaluates in place (templates/chunked_diag_decay), so log a is never written."""
    chunked_kernels: tuple[Elementwise, ...] = ()
    """With `fused_decay`: the kernels the chunked forward launches, every target but log a
    (and but C where `chunked_query` is set)."""
    chunked_query: tuple[int, float] | None = None
    """With `fused_decay`: (position of q, c) where the query is a declared tensor q times a
    constant c. The chunked forward then reads q as C and scales y by c (y is linear in C),
    so C is not written (query_scale)."""


def prologue(checked: ir.CheckedSpec) -> Prologue:
    """Targets of the prologue grouped into kernels by iteration space, and the core inputs."""
    spec, heads = checked.spec, checked.heads
    N, P = checked.state_size, checked.head_dim
    targets: list[Target] = []
    core: dict[str, str] = {}
    passthrough: dict[str, int] = {}
    lti = None

    def take(role: str, expr: E.Expr, shape: tuple[ir.Size, ...], dtype: str) -> str:
        declared = isinstance(expr, E.Ref) and any(t.name == expr.name for t in spec.tensors)
        if declared and spec.tensor(expr.name).shape == shape:  # a dim's name is no tensor
            passthrough[role] = _position(spec, expr.name)
            return f"tensors[{passthrough[role]}]"
        targets.append(Target(role=role, expr=expr, shape=shape, dtype=dtype))
        return role

    mask = spec.mask
    if isinstance(mask, ir.Causal):
        core["log_a"] = "None"
    elif isinstance(mask, ir.ConstDecay):
        log_gamma = take("log_gamma", mask.log_gamma, (_count(heads.decay),), "torch.float32")
        core["log_a"] = f'{log_gamma}.view(1, 1, -1).expand(sizes["batch"], sizes["seq"], -1)'
    elif isinstance(mask, ir.ScalarSemiseparable | ir.DiagonalSemiseparable):
        per_n: tuple[ir.Size, ...] = () if isinstance(mask, ir.ScalarSemiseparable) else (N or 1,)
        shape = (ir.BATCH, ir.SEQ, _count(heads.decay), *per_n)
        core["log_a"] = take("log_a", mask.log_a, shape, "torch.float32")
    factors = checked.value_factors
    value_shape = (ir.BATCH, ir.SEQ, _count(heads.value), P)
    if factors is not None and spec.tensor(factors.base).shape == value_shape:
        passthrough["x"] = _position(spec, factors.base)
        core["x"] = f"tensors[{passthrough['x']}]"
        core["s"] = "None"
        if factors.scale is not None:
            core["s"] = take("s", factors.scale, value_shape[:3], "torch.float32")
    else:
        core["x"] = take("x", spec.value, value_shape, _dtype_of(spec, spec.value))
        core["s"] = "None"
    if isinstance(mask, ir.Toeplitz):
        if isinstance(mask.kernel, ir.LearnedKernel):
            head = _count(heads.decay)
            lag = [a for a in expr_axes(mask.kernel.kernel, spec) if a != head]
            core["kernel"] = take("kernel", mask.kernel.kernel, (head, lag[0]), "torch.float32")
        else:
            lti = _lti_targets(checked, mask.kernel, targets)
            core["kernel"] = "kernel"
        core = {role: core[role] for role in ("x", "s", "kernel")}
        return _prologue(spec, targets, core, lti, passthrough)
    assert spec.key is not None and spec.query is not None and N is not None
    core["B"] = take(
        "B", spec.key, (ir.BATCH, ir.SEQ, _count(heads.key), N), _dtype_of(spec, spec.key)
    )
    core["C"] = take(
        "C", spec.query, (ir.BATCH, ir.SEQ, _count(heads.query), N), _dtype_of(spec, spec.query)
    )
    core = {role: core[role] for role in ("x", "s", "log_a", "B", "C")}
    return _prologue(spec, targets, core, lti, passthrough)


def _prologue(
    spec: ir.Spec,
    targets: Sequence[Target],
    core: dict[str, str],
    lti: dict[str, str] | None,
    passthrough: dict[str, int],
) -> Prologue:
    kernels = _group("prologue", spec, targets)
    ordered = tuple(t for k in kernels for t in targets if t.role in {r.role for r in k.results})
    fused, chunked, query = None, (), None
    decay = [t for t in targets if t.role == "log_a"]
    if isinstance(spec.mask, ir.DiagonalSemiseparable) and decay and isinstance(decay[0].shape[3], str):
        fused = elementwise("chunked_decay", spec, decay)
        C = [t for t in targets if t.role == "C"]
        scaled = query_scale(spec, C[0].shape) if C else None
        if scaled is not None:
            query = (_position(spec, scaled[0]), scaled[1])
        deferred = {"log_a", "C"} if query is not None else {"log_a"}
        chunked = _group("prologue", spec, [t for t in targets if t.role not in deferred])
    return Prologue(kernels=kernels, core=core, lti=lti, targets=ordered, passthrough=passthrough,
                    fused_decay=fused, chunked_kernels=chunked, chunked_query=query)


def query_scale(spec: ir.Spec, shape: tuple[ir.Size, ...]) -> tuple[str, float] | None:
    """(q, c) when the query is `q * c`, `c * q` or `q / c` for a declared tensor q of the
    query's canonical `shape` and a finite nonzero literal c (GLA's `q * 0.125`), else None."""
    match spec.query:
        case E.BinOp(op=E.Op.MUL, lhs=E.Ref(name=name), rhs=E.Num(value=c)):
            pass
        case E.BinOp(op=E.Op.MUL, lhs=E.Num(value=c), rhs=E.Ref(name=name)):
            pass
        case E.BinOp(op=E.Op.DIV, lhs=E.Ref(name=name), rhs=E.Num(value=d)) if d != 0:
            c = 1.0 / d
        case _:
            return None
    declared = {t.name: t for t in spec.tensors}
    if name not in declared or declared[name].shape != shape:
        return None
    if not math.isfinite(c) or c == 0:
        return None
    return name, float(c)


def _lti_targets(
    checked: ir.CheckedSpec, kernel: ir.LtiKernel, targets: list[Target]
) -> dict[str, str]:
    spec, N = checked.spec, checked.state_size
    assert N is not None
    for part in ("A", "B", "C", "dt"):
        value = getattr(kernel, part)
        if value is None:
            continue
        head = checked.heads.decay if checked.heads.decay in expr_axes(value, spec) else 1
        assert head is not None
        shape: tuple[ir.Size, ...] = (head,) if part == "dt" else (head, N)
        targets.append(Target(role=f"lti_{part}", expr=value, shape=shape))
    return {
        "hippo": kernel.hippo.value if kernel.hippo else "",
        "discretization": kernel.discretization.value,
        "A": "lti_A" if kernel.A is not None else "None",
        "B": "lti_B" if kernel.B is not None else "None",
    }


def epilogue(checked: ir.CheckedSpec) -> Elementwise | None:
    """The kernel of out = (y + skip) * gate, or None when the spec has neither role."""
    spec = checked.spec
    if spec.skip is None and spec.gate is None:
        return None
    shape = spec.output.shape
    core = Extra(key="@core", source="y", ptr="y", block="y_blk", shape=shape)
    target = Target(role="out", expr=_epilogue_expr(spec), shape=shape, dtype="out.dtype")
    return elementwise("epilogue", spec, [target], [core])


def fused_epilogue(checked: ir.CheckedSpec) -> TileEpilogue | None:
    """out = (y + skip) * gate as a tile epilogue of the chunked scan (applied to its fp32 y
    tile before the store, so y never round-trips through memory), or None when the spec
    has neither role or its output's head and feature axes are one dim."""
    spec = checked.spec
    if spec.skip is None and spec.gate is None:
        return None
    head, feature = spec.output.shape[2], spec.output.shape[3]
    if isinstance(head, str) and head == feature:
        return None
    target = Target(role="out", expr=_epilogue_expr(spec), shape=spec.output.shape)
    return tile_epilogue(spec, target, core="@core", head=head, feature=feature)


def output_inputs(spec: ir.Spec) -> tuple[int, ...]:
    """Positions of the tensors whose promoted dtype is y's: the per-token inputs that carry
    the output's feature axis (x, z of Mamba-2; not dt, B, C), else every per-token input.

    So bf16 activations with an fp32 dt give bf16 y, as mamba_ssm and FLA return.
    """
    inputs = [i for i, t in enumerate(spec.tensors) if t.kind is ir.TensorKind.INPUT]
    feature = spec.output.shape[3]
    if isinstance(feature, str):
        carrying = [i for i in inputs if feature in spec.tensors[i].shape]
        if carrying:
            return tuple(carrying)
    return tuple(inputs)


def _epilogue_expr(spec: ir.Spec) -> E.Expr:
    """(@core + skip) * gate, with the absent roles left out."""
    out: E.Expr = E.Ref(name="@core")
    if spec.skip is not None:
        out = E.BinOp(op=E.Op.ADD, lhs=out, rhs=spec.skip)
    if spec.gate is not None:
        out = E.BinOp(op=E.Op.MUL, lhs=out, rhs=spec.gate)
    return out


def prologue_backward(checked: ir.CheckedSpec, pro: Prologue) -> tuple[Backward, ...]:
    """One backward kernel per prologue kernel that reads a tensor: its inputs' gradients
    from `upstream[role]`, the gradient of each role it computes."""
    result = []
    for k in pro.kernels:
        roles = {r.role for r in k.results}
        group = [t for t in pro.targets if t.role in roles]
        upstream = [
            (_upstream(f"@d_{t.role}", f"u{j}", t.shape), f'upstream["{identifier(t.role)}"]')
            for j, t in enumerate(group)
        ]
        b = backward_kernel(k.name, checked.spec, group, upstream)
        if b is not None:
            result.append(b)
    return tuple(result)


@dataclass(frozen=True, slots=True, kw_only=True)
class SkipFold:
    """skip = scale ⊙ x with x the value's tensor (passed through, one per head) and scale a
    per-head [H] tensor, read by no gate: x's gradient through the skip is scale ⊙ dy of the
    core, which the core's backward adds to its own dx instead of the epilogue writing it."""

    x: int
    scale: int
    """Positions of x and of the scale among the spec's tensors."""


def skip_fold(checked: ir.CheckedSpec, pro: Prologue) -> SkipFold | None:
    """The SkipFold of the spec's skip, or None where its form is another."""
    spec = checked.spec
    skip, x = spec.skip, pro.passthrough.get("x")
    if not isinstance(skip, E.BinOp) or skip.op is not E.Op.MUL or x is None:
        return None
    names = [t.name for t in spec.tensors]
    lhs, rhs = skip.lhs, skip.rhs
    if not (isinstance(lhs, E.Ref) and isinstance(rhs, E.Ref)) or not {lhs.name, rhs.name} <= set(names):
        return None
    positions = [names.index(lhs.name), names.index(rhs.name)]
    if x not in positions or positions[0] == positions[1]:
        return None
    scale = positions[1 - positions.index(x)]
    heads = spec.output.shape[2]
    if spec.tensors[x].shape != spec.output.shape or spec.tensors[scale].shape != (heads,):
        return None
    if spec.gate is not None and spec.tensors[x].name in E.refs(spec.gate):
        return None
    return SkipFold(x=x, scale=scale)


def epilogue_backward(checked: ir.CheckedSpec, fold: SkipFold | None = None) -> Backward | None:
    """The backward kernel of out = (y + skip) * gate: dy and the skip/gate tensors' gradients
    (with `fold`, none for x: the core's backward adds it)."""
    spec = checked.spec
    if spec.skip is None and spec.gate is None:
        return None
    shape = spec.output.shape
    target = Target(role="out", expr=_epilogue_expr(spec), shape=shape)
    core = Extra(key="@core", source="y", ptr="y", block="y_blk", shape=shape)
    return backward_kernel(
        "epilogue",
        spec,
        [target],
        [(_upstream("@d_out", "u0", shape), "dout")],
        [(core, "y")],
        sum_rows=True,
        constant=frozenset() if fold is None else frozenset({spec.tensors[fold.x].name}),
    )


def _upstream(key: str, name: str, shape: tuple[ir.Size, ...]) -> Extra:
    """The extra holding an upstream gradient: launcher argument and kernel pointer `name`."""
    return Extra(key=key, source=name, ptr=name, block=f"{name}_blk", shape=shape)


def _group(stage: str, spec: ir.Spec, targets: Sequence[Target]) -> tuple[Elementwise, ...]:
    """One kernel per distinct iteration space, named after the roles it computes."""
    groups: dict[tuple[str, ...], list[Target]] = {}
    for t in targets:
        groups.setdefault(tuple(a for a in t.shape if isinstance(a, str)), []).append(t)
    return tuple(
        elementwise("_".join([stage, *(t.role for t in group)]), spec, group)
        for group in groups.values()
    )


def _count(size: ir.Size | None) -> ir.Size:
    """A role's head count as a shape entry: a dim name, or the literal 1."""
    return 1 if size is None else size


def _position(spec: ir.Spec, name: str) -> int:
    return [t.name for t in spec.tensors].index(name)


def _dtype_of(spec: ir.Spec, value: E.Expr) -> str:
    """The dtype a materialised role keeps: that of the first input it reads, else fp32."""
    used = E.refs(value)
    for position, tensor in enumerate(spec.tensors):
        if tensor.name in used and tensor.kind is ir.TensorKind.INPUT:
            return f"tensors[{position}].dtype"
    return "torch.float32"
