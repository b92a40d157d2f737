"""Elementwise kernels: expressions evaluated over a named iteration space (their layout).

The iteration space of a kernel is the set of named axes of its results. `batch` comes
from the program id, `seq` is the row axis of a [BLOCK_R, BLOCK_C] tile, and every other
axis is flattened (last fastest) into the column axis. A declared tensor is loaded with
the index of each of its named axes; its literal-1 axes are broadcast (index 0).
`elementwise` lays out one kernel (operands, body printed by ssmc.expr_triton, results);
the prologue/epilogue templates write it, forward (`_fwd_kernel`) or backward (`_bwd_kernel`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ssmc import expr as E
from ssmc import ir
from ssmc.expr_grad import ZERO, Gradients, Step, add
from ssmc.expr_triton import Emitter, fold, identifier, prefixed

ROW_INDEX = "o_r[:, None]"
BATCH_INDEX = "i_b"
ROW_MASK = "m_r[:, None]"
COL_MASK = "m_c[None, :]"


@dataclass(frozen=True, slots=True, kw_only=True)
class Flat:
    """A tensor holding every column axis of its kernel, in order: where its column strides
    chain (stride of each = the next one's times its size, checked by the launcher) the
    kernel's FLAT variant reads it at `o_c` times the last stride — contiguous addresses the
    compiler can vectorise — instead of one index per axis."""

    offset: str
    chain: tuple[tuple[int, int, str], ...]
    """(dim, next dim, the next dim's size name) for each pair of consecutive column axes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Operand:
    """A tensor an elementwise kernel reads: where it comes from and how it is loaded."""

    label: str
    """What the source comment calls it: the declared name, or `y` for the core output."""
    source: str
    """The launcher's Python expression for the tensor (`tensors[2]`, `y`)."""
    ptr: str
    block: str
    strides: tuple[tuple[str, int], ...]
    """(kernel argument, dimension of the tensor) for each named axis."""
    offset: str
    mask: str | None
    tile: str
    """The loaded block's shape, for the source comment."""
    decl: str
    flat: Flat | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """One output tensor of an elementwise kernel, allocated by the launcher."""

    role: str
    ptr: str
    shape: tuple[ir.Size, ...]
    strides: tuple[tuple[str, int], ...]
    offset: str
    value: str
    """The atom holding the result: an identifier, or a literal when `constant`."""
    constant: bool
    dtype: str
    """The launcher's Python expression for the result's torch dtype."""
    text: str
    """The expression in the spec's notation, for the source comment (names validated)."""
    flat: Flat | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ColAxis:
    """One axis flattened into the column index: its size argument and index variable."""

    name: str
    size: str
    index: str
    decompose: str
    """How the axis index is recovered from the flat column index `o_c`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Elementwise:
    """Everything a template needs to write one elementwise kernel and its launcher."""

    name: str
    batch: bool
    seq: bool
    cols: tuple[ColAxis, ...]
    dims: tuple[tuple[str, str], ...]
    """(kernel argument, dim name) for each call-time dim the expressions read, as floats."""
    operands: tuple[Operand, ...]
    body: tuple[str, ...]
    results: tuple[Result, ...]
    extra_args: tuple[str, ...] = ()
    """Launcher arguments besides `tensors` and `sizes` (the core output `y` for the epilogue)."""
    direction: str = "fwd"
    """"fwd", or "bwd" for a gradient kernel (named `<name>_bwd_kernel`, `<name>_bwd_launch`)."""
    row_sums: tuple[int, ...] = ()
    """Results summed over the row (seq) axis inside the kernel: each program adds up a group
    of rows and the launcher returns them as partial sums, [.., groups, ..] in seq's place."""

    @property
    def flat(self) -> bool:
        """Whether some tensor has a flat column offset (the kernel then takes FLAT)."""
        return any(t.flat is not None for t in (*self.operands, *self.results))

    @property
    def kernel(self) -> str:
        """The `@triton.jit` function's name."""
        return f"{self.name}_{self.direction}_kernel"

    @property
    def launcher(self) -> str:
        """The Python function that launches the kernel (allocating only the partial sums of
        `row_sums`, which it returns)."""
        return f"{self.name}_launch" if self.direction == "fwd" else f"{self.name}_bwd_launch"


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A result to compute: `role` ← `expr` laid out as `shape` (canonical, literal 1s kept)."""

    role: str
    expr: E.Expr
    shape: tuple[ir.Size, ...]
    dtype: str = "torch.float32"


@dataclass(frozen=True, slots=True, kw_only=True)
class Extra:
    """A tensor that is not declared in the spec: the core output read by the epilogue, or
    an upstream gradient read by a backward kernel."""

    key: str
    """The internal name expressions refer to it by (`@core`, `@dout`, `@d_log_a`)."""
    source: str
    """The launcher's parameter holding it (also its kernel pointer's comment label)."""
    ptr: str
    block: str
    shape: tuple[ir.Size, ...]


def elementwise(
    name: str,
    spec: ir.Spec,
    targets: Sequence[Target],
    extras: Sequence[Extra] = (),
    *,
    steps: Sequence[Step] = (),
    direction: str = "fwd",
    row_sums: Sequence[int] = (),
) -> Elementwise:
    """Lay out the kernel `<name>_<direction>_kernel` computing every target over one
    iteration space; `steps` define the indicators that derivatives (ssmc.expr_grad) use."""
    identifier(name)
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"direction is fwd or bwd, not {direction!r}")
    axes = tuple(a for a in targets[0].shape if isinstance(a, str))
    if row_sums and ir.SEQ not in axes:
        raise ValueError("row sums need a seq axis in the iteration space")
    for t in targets:
        if tuple(a for a in t.shape if isinstance(a, str)) != axes:
            raise ValueError(f"targets of one elementwise kernel share axes: {t.role} differs")
    cols = tuple(a for a in axes if a not in (ir.BATCH, ir.SEQ))
    index = {ir.BATCH: BATCH_INDEX, ir.SEQ: ROW_INDEX}
    col_axes = []
    for k, axis in enumerate(cols):
        size, var = f"n_{k}", f"o_{k}"
        inner = " * ".join(f"n_{j}" for j in range(k + 1, len(cols)))
        flat = f"(o_c // ({inner}))" if inner else "o_c"
        decompose = flat if k == 0 else f"{flat} % {size}"
        col_axes.append(ColAxis(name=identifier(axis), size=size, index=var, decompose=decompose))
        index[axis] = f"{var}[None, :]"

    bound = {d.name: d.value for d in spec.dims}
    exprs = [
        E.substitute(t.expr, {n: E.Num(value=float(v)) for n, v in bound.items() if v is not None})
        for t in targets
    ]
    used = set().union(*(E.refs(x) for x in exprs), *(E.refs(s.lhs) | E.refs(s.rhs) for s in steps))
    names: dict[str, str] = {}
    dims = []
    for d in spec.dims:
        if d.name in used:
            names[d.name] = prefixed("d_", d.name)
            dims.append((names[d.name], d.name))
    operands = []
    for position, tensor in enumerate(spec.tensors):
        if tensor.name in used:
            names[tensor.name] = prefixed("b_", tensor.name)
            operands.append(
                _operand(
                    label=tensor.name,
                    source=f"tensors[{position}]",
                    ptr=prefixed("p_", tensor.name),
                    block=names[tensor.name],
                    stride_prefix=prefixed("s_", tensor.name) + "_",
                    shape=tensor.shape,
                    index=index,
                    kernel_cols=cols,
                )
            )
    # an extra the expressions do not read is neither loaded nor a launcher argument
    extras = [extra for extra in extras if extra.key in used]
    for extra in extras:
        names[extra.key] = identifier(extra.block)
        operands.append(
            _operand(
                label=extra.source,
                source=extra.source,
                ptr=identifier(extra.ptr),
                block=extra.block,
                stride_prefix=f"{extra.ptr}_s",
                shape=extra.shape,
                index=index,
                kernel_cols=cols,
            )
        )

    emitter = Emitter(names, steps)
    results = []
    for j, (target, value) in enumerate(zip(targets, exprs, strict=True)):
        ptr = f"out{j}"
        strides = tuple(
            (f"{ptr}_s{k}", k) for k, a in enumerate(target.shape) if isinstance(a, str)
        )
        offset = (
            " + ".join(
                f"{index[a]} * {ptr}_s{k}" for k, a in enumerate(target.shape) if isinstance(a, str)
            )
            or "0"
        )
        results.append(
            Result(
                role=identifier(target.role),
                ptr=ptr,
                shape=target.shape,
                strides=strides,
                offset=offset,
                value=emitter.emit(value),
                constant=fold(value) is not None,
                dtype=target.dtype,
                text=E.show(target.expr).replace("@core", "y").replace("@", ""),
                flat=_flat(target.shape, {k: st for st, k in strides}, index, cols),
            )
        )
    return Elementwise(
        name=name,
        batch=ir.BATCH in axes,
        seq=ir.SEQ in axes,
        cols=tuple(col_axes),
        dims=tuple(dims),
        operands=tuple(operands),
        body=tuple(emitter.lines),
        results=tuple(results),
        extra_args=tuple(e.source for e in extras),
        direction=direction,
        row_sums=tuple(row_sums),
    )


def _operand(
    *,
    label: str,
    source: str,
    ptr: str,
    block: str,
    stride_prefix: str,
    shape: tuple[ir.Size, ...],
    index: Mapping[str, str],
    row_index: str = ROW_INDEX,
    masks: tuple[str, str] = (ROW_MASK, COL_MASK),
    kernel_cols: tuple[str, ...] = (),
) -> Operand:
    terms, strides = [], []
    for k, axis in enumerate(shape):
        if not isinstance(axis, str):
            continue
        if axis not in index:
            raise ValueError(f"{label} has the axis {axis}, which the kernel does not iterate")
        stride = identifier(f"{stride_prefix}{k}")
        strides.append((stride, k))
        terms.append(f"{index[axis]} * {stride}")
    rows = row_index in " ".join(terms)
    cols = "[None, :]" in " ".join(terms)
    mask = " & ".join(m for m, on in zip(masks, (rows, cols), strict=True) if on) or None
    tile = {
        (True, True): "[BLOCK_R, BLOCK_C]",
        (True, False): "[BLOCK_R, 1]",
        (False, True): "[1, BLOCK_C]",
        (False, False): "[]",
    }[(rows, cols)]
    decl = "[" + ", ".join(str(a) for a in shape) + "]"
    return Operand(
        label=label,
        source=source,
        ptr=ptr,
        block=identifier(block),
        strides=tuple(strides),
        offset=" + ".join(terms) or "0",
        mask=mask,
        tile=tile,
        decl=decl,
        flat=_flat(shape, {k: st for st, k in strides}, index, kernel_cols),
    )


def _flat(
    shape: tuple[ir.Size, ...], stride_of: Mapping[int, str], index: Mapping[str, str],
    cols: tuple[str, ...],
) -> Flat | None:
    """The flat column offset of a tensor with every one of the kernel's (two or more) column
    axes in order, else None (one column axis is contiguous already)."""
    named = [(k, a) for k, a in enumerate(shape) if isinstance(a, str)]
    col_dims = [(k, a) for k, a in named if a not in (ir.BATCH, ir.SEQ)]
    if len(cols) < 2 or tuple(a for _, a in col_dims) != tuple(cols):
        return None
    terms = [f"{index[a]} * {stride_of[k]}" for k, a in named if a in (ir.BATCH, ir.SEQ)]
    terms.append(f"o_c[None, :] * {stride_of[col_dims[-1][0]]}")
    chain = tuple(
        (k, k2, identifier(a2)) for (k, _), (k2, a2) in zip(col_dims, col_dims[1:], strict=False)
    )
    return Flat(offset=" + ".join(terms), chain=chain)


# ---------------------------------------------------------------------------------------
# Tile epilogues: an expression applied to a core kernel's output tile before its store.
# ---------------------------------------------------------------------------------------

TILE_ROWS = "o_t[:, None]"
"""The token index of a tile's rows in the core kernel (absolute, [BLOCK_M, 1])."""
TILE_COLS = "o_p[None, :]"
"""The feature index of a tile's columns in the core kernel ([1, BLOCK_P])."""
TILE_MASKS = ("m_i[:, None]", "m_p[None, :]")


@dataclass(frozen=True, slots=True, kw_only=True)
class TileEpilogue:
    """`value` ← an expression of the core output tile `e_y` and declared tensors, written
    into a core kernel that holds an output tile [BLOCK_M rows, BLOCK_P features] of one
    (batch row `i_b`, head `i_h`); every name it binds starts with `e` (no kernel local
    does)."""

    params: tuple[str, ...]
    """The kernel parameters it adds: pointers, strides, call-time dims (floats)."""
    args: tuple[str, ...]
    """The launcher's Python expression for each parameter (of `tensors`, `sizes`)."""
    dummies: tuple[str, ...]
    """A placeholder for each parameter when the epilogue is off (`x`, 0 or 1.0)."""
    loads: tuple[str, ...]
    """The tensors' tiles, in their own dtypes (a kernel may issue them early)."""
    body: tuple[str, ...]
    """fp32 conversions of the tiles, then the expression's assignments."""
    value: str
    text: str


def tile_epilogue(
    spec: ir.Spec, target: Target, *, core: str, head: ir.Size, feature: ir.Size
) -> TileEpilogue:
    """The expression `target` (reading the core output as `core`) over a core kernel's output
    tile: batch → `i_b`, seq → rows `o_t`, the axis `head` → `i_h`, `feature` → columns `o_p`."""
    index = {ir.BATCH: BATCH_INDEX, ir.SEQ: TILE_ROWS}
    if isinstance(head, str):
        index[head] = "i_h"
    if isinstance(feature, str):
        index[feature] = TILE_COLS
    bound = {d.name: E.Num(value=float(d.value)) for d in spec.dims if d.value is not None}
    expr = E.substitute(target.expr, dict(bound))
    used = E.refs(expr)
    names: dict[str, str] = {core: "e_y"}
    params: list[str] = []
    args: list[str] = []
    dummies: list[str] = []
    loads: list[str] = []
    converts: list[str] = []
    for position, tensor in enumerate(spec.tensors):
        if tensor.name not in used:
            continue
        o = _operand(
            label=tensor.name,
            source=f"tensors[{position}]",
            ptr=prefixed("ep_", tensor.name),
            block=prefixed("eb_", tensor.name),
            stride_prefix=prefixed("es_", tensor.name) + "_",
            shape=tensor.shape,
            index=index,
            row_index=TILE_ROWS,
            masks=TILE_MASKS,
        )
        names[tensor.name] = o.block
        params += [o.ptr, *(name for name, _ in o.strides)]
        args += [o.source, *(f"{o.source}.stride({d})" for _, d in o.strides)]
        dummies += ["x", *("0" for _ in o.strides)]
        mask = f", mask={o.mask}, other=1.0" if o.mask else ""
        tile = o.tile.replace("BLOCK_R", "BLOCK_M").replace("BLOCK_C", "BLOCK_P")
        loads.append(f"{o.block} = tl.load({o.ptr} + {o.offset}{mask})  # {tile}")
        converts.append(f"{o.block} = {o.block}.to(tl.float32)")
    for d in spec.dims:
        if d.name in used:
            names[d.name] = prefixed("ed_", d.name)
            params.append(names[d.name])
            args.append(f'float(sizes["{identifier(d.name)}"])')
            dummies.append("1.0")
    emitter = Emitter(names)
    value = emitter.emit(expr)
    return TileEpilogue(
        params=tuple(params),
        args=tuple(args),
        dummies=tuple(dummies),
        loads=tuple(loads),
        body=(*converts, *emitter.lines),
        value=value,
        text=E.show(target.expr).replace(core, "y").replace("@", ""),
    )


# ---------------------------------------------------------------------------------------
# Backward kernels: the gradients of a forward kernel's inputs from its outputs' gradients.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class GradientSum:
    """How a per-element gradient (a result of a backward kernel) becomes a tensor's gradient:
    summed over the iteration axes the tensor lacks (its broadcast axes), the rest permuted
    into the tensor's order and viewed with its literal-1 axes."""

    result: int
    position: int
    """The tensor's position among the spec's declared tensors."""
    dims: tuple[int, ...]
    perm: tuple[int, ...]
    shape: tuple[ir.Size, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Backward:
    """A backward elementwise kernel, what its launcher is given and where its results go."""

    kernel: Elementwise
    args: tuple[str, ...]
    """The launcher's Python expression for each of `kernel.extra_args`."""
    sums: tuple[GradientSum, ...]
    extras: dict[str, int]
    """Internal input (`@core`) → index of its gradient among the results; absent when that
    gradient is the upstream gradient itself (∂out/∂input = 1)."""


def backward_kernel(
    name: str,
    spec: ir.Spec,
    targets: Sequence[Target],
    upstream: Sequence[tuple[Extra, str]],
    inputs: Sequence[tuple[Extra, str]] = (),
    *,
    sum_rows: bool = False,
    constant: frozenset[str] = frozenset(),
) -> Backward | None:
    """The kernel `<name>_bwd_kernel`: for every float tensor v the targets read (and every
    input extra), the per-element Σ_r d_r · ∂target_r/∂v over the targets' iteration space.

    `upstream[r]` is (the extra holding d_r, keyed `@d_<role>`, the launcher's expression for
    it), one per target; `inputs` are further extras the targets read (`@core`).
    None when every gradient is 0 (the targets read no tensor). `sum_rows`: the gradients of
    tensors without a seq axis are summed over seq inside the kernel (Elementwise.row_sums).
    `constant`: tensors whose gradient through the targets is formed elsewhere (none here).
    """
    bound = {d.name: E.Num(value=float(d.value)) for d in spec.dims if d.value is not None}
    exprs = [E.substitute(t.expr, dict(bound)) for t in targets]
    grads = Gradients()
    used = set().union(*(E.refs(x) for x in exprs))
    tensors = [(p, t) for p, t in enumerate(spec.tensors) if t.name in used]
    names = [t.name for _, t in tensors] + [extra.key for extra, _ in inputs]
    results: list[Target] = []
    extras: dict[str, int] = {}
    sums: list[GradientSum] = []
    shape = targets[0].shape
    # reverse accumulation: one walk per target gives the gradients of everything it reads
    totals: dict[str, E.Expr] = {}
    for expr, (d_r, _) in zip(exprs, upstream, strict=True):
        for v, g in grads.gradients(expr, E.Ref(name=d_r.key)).items():
            totals[v] = add(totals.get(v, ZERO), g)
    for v in names:
        total = totals.get(v, ZERO)
        if total == ZERO or v in constant:
            continue
        if v.startswith("@"):
            if len(upstream) == 1 and total == E.Ref(name=upstream[0][0].key):
                continue  # the upstream gradient passes through unchanged
            extras[v] = len(results)
            results.append(Target(role="d_" + v[1:], expr=total, shape=shape))
            continue
        position, tensor = next((p, t) for p, t in tensors if t.name == v)
        dims, perm = _reduction(shape, tensor.shape)
        sums.append(
            GradientSum(
                result=len(results), position=position, dims=dims, perm=perm, shape=tensor.shape
            )
        )
        results.append(Target(role="d_" + v, expr=total, shape=shape))
    if not results:
        return None
    pairs = [*upstream, *inputs]
    seq_axis = shape.index(ir.SEQ) if ir.SEQ in shape else None
    row_sums = [g.result for g in sums if sum_rows and seq_axis is not None and seq_axis in g.dims]
    kernel = elementwise(
        name,
        spec,
        results,
        [e for e, _ in pairs],
        steps=grads.steps,
        direction="bwd",
        row_sums=row_sums,
    )
    source = {e.source: arg for e, arg in pairs}
    return Backward(
        kernel=kernel,
        args=tuple(source[a] for a in kernel.extra_args),
        sums=tuple(sums),
        extras=extras,
    )


def _reduction(
    space: tuple[ir.Size, ...], shape: tuple[ir.Size, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(axes of `space` to sum, permutation of the rest) that bring a gradient over `space`
    to a tensor of `shape`: named axes match by name; literal-1 axes are summed (size 1)."""
    named = [a for a in shape if isinstance(a, str)]
    if len(set(named)) != len(named):
        raise ValueError(f"no gradient for a tensor with a repeated axis: {list(shape)}")
    keep = [i for i, a in enumerate(space) if isinstance(a, str) and a in named]
    kept = [space[i] for i in keep]
    if sorted(map(str, kept)) != sorted(named):
        raise ValueError(f"the axes {named} are not all in the iteration space {list(space)}")
    dims = tuple(i for i in range(len(space)) if i not in keep)
    return dims, tuple(kept.index(a) for a in named)
