"""Print expression ASTs as Triton source: the only place expressions become kernel code.

An expression becomes straight-line code, one assignment per operation (`t_3 = t_1 * b_A`),
so every subexpression is computed once and shared between the outputs of a kernel.
Names reach the source only as validated identifiers chosen by the caller (`b_dt` for the
block loaded from tensor `dt`); numbers are printed from the parsed float, never from text.
Every function is expanded into overflow-free fp32 code: softplus and logsigmoid go through
log1p(exp(−|v|)), sigmoid and tanh through exp(−|v|), so no lane ever computes exp of a
large positive number (which the CPU interpreter also reports as an error).
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ssmc import expr as E
from ssmc import ir
from ssmc.errors import SsmcError
from ssmc.expr_torch import evaluate_named

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
TEMP_PREFIX = "t_"
"""Temporaries are `t_0, t_1, ...`; callers must not bind names that start with it."""

_SMALL_POWER = 64
"""Integer powers up to this size are computed by repeated squaring (no log of 0)."""
_TANH_SERIES = 0.125
"""Below this |v|, tanh uses its Taylor series (1 − exp(−2|v|) cancels there)."""


class UnsafeNameError(SsmcError, ValueError):
    """A name that would reach generated source is not a plain identifier."""


def identifier(name: str) -> str:
    """`name` itself if it is a plain identifier and not a Python keyword, else raise."""
    if not isinstance(name, str) or not IDENTIFIER.match(name) or keyword.iskeyword(name):
        raise UnsafeNameError(
            f"{name!r} cannot appear in generated code: names must match "
            f"[A-Za-z_][A-Za-z0-9_]* and not be a Python keyword"
        )
    return name


def prefixed(prefix: str, name: str) -> str:
    """`prefix + name`, a validated identifier that cannot shadow a builtin or a kernel local."""
    return identifier(identifier(prefix) + identifier(name))


def number(value: float) -> str:
    """A float literal Triton accepts, printed from the value (repr round-trips exactly)."""
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else '(-float("inf"))'
    text = repr(value)
    return f"({text})" if value < 0 or text.startswith("-") else text


def fold(expr: E.Expr) -> float | None:
    """The value of a constant expression (it reads no tensor or dim), else None.

    Constants are evaluated by the torch evaluator in fp64, so a folded value is exactly
    what the reference computes; Triton never sees an operation on two literals.
    """
    if E.refs(expr):
        return None
    value, _ = evaluate_named(expr, {}, {})
    return float(value)


class Emitter:
    """Turns expressions into assignments; shared subexpressions are emitted once.

    `names` maps each referenced name (tensor or dim) to the identifier that holds its
    value in the kernel. `emit` returns the source atom holding the result: a
    temporary, a bound identifier or a number literal.
    """

    def __init__(self, names: Mapping[str, str]) -> None:
        for bound in names.values():
            identifier(bound)
            if bound.startswith(TEMP_PREFIX):
                raise UnsafeNameError(f"{bound!r} collides with the temporaries {TEMP_PREFIX}*")
        self._names = dict(names)
        self._memo: dict[E.Expr, str] = {}
        self.lines: list[str] = []

    def emit(self, expr: E.Expr) -> str:
        """Emit the code of `expr`; return the atom (identifier or literal) holding it."""
        return self._emit(E.strip_spans(expr))

    def _emit(self, expr: E.Expr) -> str:
        constant = fold(expr)
        if constant is not None:
            return number(constant)
        if isinstance(expr, E.Ref):
            if expr.name not in self._names:
                raise UnsafeNameError(f"no kernel value is bound to the name {expr.name!r}")
            return self._names[expr.name]
        if expr not in self._memo:
            self._memo[expr] = self._compute(expr)
        return self._memo[expr]

    def assign(self, code: str) -> str:
        name = f"{TEMP_PREFIX}{len(self.lines)}"
        self.lines.append(f"{name} = {code}")
        return name

    def _compute(self, expr: E.Expr) -> str:
        match expr:
            case E.Neg(operand=operand):
                return self.assign(f"-{self._emit(operand)}")
            case E.BinOp(op=E.Op.POW, lhs=lhs, rhs=rhs):
                return self._power(lhs, rhs)
            case E.BinOp(op=op, lhs=lhs, rhs=rhs):
                return self.assign(f"{self._emit(lhs)} {op.value} {self._emit(rhs)}")
            case E.Call(func=func, args=args):
                return _FUNCS[func](self, [self._emit(a) for a in args])
        raise TypeError(f"cannot print {expr!r}")

    def _power(self, lhs: E.Expr, rhs: E.Expr) -> str:
        base = self._emit(lhs)
        exponent = fold(rhs)
        if exponent is not None and exponent.is_integer() and abs(exponent) <= _SMALL_POWER:
            n = int(abs(exponent))
            if n == 0:
                return self.assign(f"tl.where({base} != {base}, 1.0, 1.0)")
            result = self._integer_power(base, n)
            return self.assign(f"1.0 / {result}") if exponent < 0 else result
        if exponent == 0.5:
            return self.assign(f"tl.sqrt({base})")
        log = self.assign(f"tl.log({base})")
        return self.assign(f"tl.exp({self._emit(rhs)} * {log})")

    def _integer_power(self, base: str, n: int) -> str:
        """base**n by repeated squaring."""
        result: str | None = None
        square = base
        while n:
            if n & 1:
                result = square if result is None else self.assign(f"{result} * {square}")
            n >>= 1
            if n:
                square = self.assign(f"{square} * {square}")
        assert result is not None
        return result

    def log1p(self, u: str) -> str:
        """log(1 + u) for u ≥ 0, exact to a few ulps even when 1 + u rounds to 1 (Goldberg)."""
        w = self.assign(f"1.0 + {u}")
        ratio = self.assign(f"{u} / tl.where({w} == 1.0, 1.0, {w} - 1.0)")
        return self.assign(f"tl.where({w} == 1.0, {u}, tl.log({w}) * {ratio})")

    def exp_neg_abs(self, v: str) -> str:
        """exp(−|v|) ∈ (0, 1]: never overflows."""
        return self.assign(f"tl.exp(-tl.abs({v}))")

    def sigmoid(self, v: str) -> str:
        e = self.exp_neg_abs(v)
        return self.assign(f"tl.where({v} >= 0, 1.0 / (1.0 + {e}), {e} / (1.0 + {e}))")


def _softplus(em: Emitter, args: list[str]) -> str:
    (v,) = args
    tail = em.log1p(em.exp_neg_abs(v))
    return em.assign(f"tl.maximum({v}, 0.0) + {tail}")


def _logsigmoid(em: Emitter, args: list[str]) -> str:
    (v,) = args
    tail = em.log1p(em.exp_neg_abs(v))
    return em.assign(f"tl.minimum({v}, 0.0) - {tail}")


def _silu(em: Emitter, args: list[str]) -> str:
    (v,) = args
    return em.assign(f"{v} * {em.sigmoid(v)}")


def _tanh(em: Emitter, args: list[str]) -> str:
    (v,) = args
    a = em.assign(f"tl.abs({v})")
    e = em.assign(f"tl.exp(-2.0 * {a})")
    big = em.assign(f"(1.0 - {e}) / (1.0 + {e})")
    v2 = em.assign(f"{v} * {v}")
    small = em.assign(
        f"{a} * (1.0 + {v2} * (-1.0 / 3.0 + {v2} * (2.0 / 15.0 - {v2} * (17.0 / 315.0))))"
    )
    magnitude = em.assign(f"tl.where({a} < {_TANH_SERIES!r}, {small}, {big})")
    return em.assign(f"tl.where({v} < 0, -{magnitude}, {magnitude})")


def _clamp(em: Emitter, args: list[str]) -> str:
    v, lo, hi = args
    if lo != number(-math.inf):
        v = em.assign(f"tl.maximum({v}, {lo})")
    if hi != number(math.inf):
        v = em.assign(f"tl.minimum({v}, {hi})")
    return v


def _unary(template: str) -> Callable[[Emitter, list[str]], str]:
    def emit(em: Emitter, args: list[str]) -> str:
        return em.assign(template.format(*args))

    return emit


_FUNCS: dict[E.Func, Callable[[Emitter, list[str]], str]] = {
    E.Func.EXP: _unary("tl.exp({0})"),
    E.Func.LOG: _unary("tl.log({0})"),
    E.Func.SQRT: _unary("tl.sqrt({0})"),
    E.Func.ABS: _unary("tl.abs({0})"),
    E.Func.MIN: _unary("tl.minimum({0}, {1})"),
    E.Func.MAX: _unary("tl.maximum({0}, {1})"),
    E.Func.SOFTPLUS: _softplus,
    E.Func.LOGSIGMOID: _logsigmoid,
    E.Func.SIGMOID: lambda em, args: em.sigmoid(args[0]),
    E.Func.SILU: _silu,
    E.Func.TANH: _tanh,
    E.Func.CLAMP: _clamp,
}
assert set(_FUNCS) == set(E.Func), "every function of the language has a Triton expansion"


def to_triton(expr: E.Expr, names: Mapping[str, str]) -> tuple[list[str], str]:
    """Straight-line Triton code for one expression: (assignments, result atom)."""
    em = Emitter(names)
    result = em.emit(expr)
    return em.lines, result


# ---------------------------------------------------------------------------------------
# Elementwise kernels: expressions evaluated over a named iteration space.
#
# The iteration space of a kernel is the set of named axes of its results. `batch` comes
# from the program id, `seq` is the row axis of a [BLOCK_R, BLOCK_C] tile, and every other
# axis is flattened (last fastest) into the column axis. A declared tensor is loaded with
# the index of each of its named axes; its literal-1 axes are broadcast (index 0).
# ---------------------------------------------------------------------------------------

ROW_INDEX = "o_r[:, None]"
BATCH_INDEX = "i_b"
ROW_MASK = "m_r[:, None]"
COL_MASK = "m_c[None, :]"


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """A result to compute: `role` ← `expr` laid out as `shape` (canonical, literal 1s kept)."""

    role: str
    expr: E.Expr
    shape: tuple[ir.Size, ...]
    dtype: str = "torch.float32"


@dataclass(frozen=True, slots=True, kw_only=True)
class Extra:
    """A tensor that is not declared in the spec (the core output read by the epilogue)."""

    key: str
    source: str
    ptr: str
    block: str
    shape: tuple[ir.Size, ...]


def elementwise(
    name: str, spec: ir.Spec, targets: Sequence[Target], extras: Sequence[Extra] = ()
) -> Elementwise:
    """Lay out the kernel `<name>_fwd_kernel` computing every target over one iteration space."""
    identifier(name)
    axes = tuple(a for a in targets[0].shape if isinstance(a, str))
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
    used = set().union(*(E.refs(x) for x in exprs))
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
                )
            )
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
            )
        )

    emitter = Emitter(names)
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
                text=E.show(target.expr).replace("@core", "y"),
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
    rows = ROW_INDEX in " ".join(terms)
    cols = "[None, :]" in " ".join(terms)
    mask = " & ".join(m for m, on in ((ROW_MASK, rows), (COL_MASK, cols)) if on) or None
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
    )
