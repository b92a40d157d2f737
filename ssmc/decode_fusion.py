"""The one-token decode step as one kernel: prologue and output roles rendered into it.

`decode_fusion(checked)` lays out what templates/decode.py.jinja needs to compute, inside
`decode_fwd_kernel`, the core inputs of one token (X̄ = value, B = key, C = query, log a)
from the spec's expressions and to apply its output roles (out = (y + skip) * gate) to
the kernel's fp32 y before the store, so that a decode step is one launch instead of
prologue kernels + decode + epilogue (each Triton launch costs tens of µs of host time).

Each role's expression is evaluated at the kernel's point: batch → `i_b`, seq → token 0
(a one-token call: the seq axis is neither indexed nor passed), the role's head axis →
its group index (`i_v`, `i_k`, `i_q`, `i_d`; `i_h` when it is the output's head axis),
the state axis N → the vector `o_n`, the feature axis P → the vector `o_p`. Tensors are
loaded once per distinct offset and all roles share one ssmc.expr_triton.Emitter, so a
subexpression common to two roles (Mamba's softplus(dt + dt_bias)) is computed once.

Returns None (the module keeps the separate launches) for what this cannot express: a
mask other than causal / constant / scalar / diagonal decay, a head count that is a
literal other than 1, or a role whose axes repeat a name (head axis = N or P).
Expressions come from the validated IR only; names reach the source as identifiers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ssmc import expr as E
from ssmc import ir
from ssmc.expr_triton import Emitter, fold, identifier, number, prefixed
from ssmc.roles import _epilogue_expr


@dataclass(frozen=True, slots=True, kw_only=True)
class FusedTensor:
    """A declared tensor the fused kernel reads: its pointer and the strides it is passed."""

    position: int
    ptr: str
    strides: tuple[tuple[str, int], ...]
    """(kernel parameter, dimension of the tensor) for each indexed axis (seq left out)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeFusion:
    """Everything decode.py.jinja needs to write the fused decode kernel and its launcher."""

    tensors: tuple[FusedTensor, ...]
    dims: tuple[tuple[str, str], ...]
    """(kernel parameter, dim name) of each call-time dim the expressions read, as floats."""
    groups: dict[str, str]
    """Role letter (v, k, q, d) → the launcher's Python expression for its head count."""
    loads: tuple[str, ...]
    body: tuple[str, ...]
    """The loaded blocks' fp32 conversions and the core inputs' assignments."""
    epilogue: tuple[str, ...]
    """The assignments of out that the core inputs do not share (they read `b_y`)."""
    x: str
    B: str
    C: str
    log_a: str | None
    """Atoms holding X̄ [BLOCK_P], B, C [BLOCK_N], log a ([] or [BLOCK_N]; None: no decay)."""
    out: str
    """The atom holding out (the output roles applied to `b_y`), [BLOCK_P]."""
    text: dict[str, str]
    """Role → its expression in the spec's notation, for the source comment."""

    @property
    def params(self) -> tuple[str, ...]:
        """The kernel parameters it adds, in launch order."""
        names = [n for t in self.tensors for n in (t.ptr, *(s for s, _ in t.strides))]
        return (*names, *(p for p, _ in self.dims))


_MASKS = {"o_n": "m_n", "o_p": "m_p"}
_CORE = "b_y"


def decode_fusion(checked: ir.CheckedSpec) -> DecodeFusion | None:
    """The fused decode step of `checked`, or None where it keeps the separate launches."""
    spec, heads = checked.spec, checked.heads
    mask = spec.mask
    if not isinstance(mask, ir.Causal | ir.ConstDecay | ir.ScalarSemiseparable
                      | ir.DiagonalSemiseparable):
        return None
    if spec.key is None or spec.query is None or checked.state_size is None:
        return None
    N, P = checked.state_size, spec.output.shape[3]
    H = spec.output.shape[2]
    counts = {"v": heads.value, "k": heads.key, "q": heads.query, "d": heads.decay}
    if any(isinstance(c, int) and c != 1 for c in (*counts.values(), H)):
        return None
    if not isinstance(H, str):
        return None

    def context(role: str, vector: ir.Size | None, var: str | None) -> dict[str, str] | None:
        head = counts[role] if role != "h" else H
        index = {ir.BATCH: "i_b"}
        named = [a for a in (head, vector) if isinstance(a, str)]
        if len(set(named)) != len(named) or ir.BATCH in named or ir.SEQ in named:
            return None
        if isinstance(head, str):
            index[head] = "i_h" if head == H else f"i_{role}"
        if isinstance(vector, str) and var is not None:
            index[vector] = var
        return index

    roles: list[tuple[str, E.Expr, dict[str, str] | None]] = [
        ("x", spec.value, context("v", P, "o_p")),
        ("B", spec.key, context("k", N, "o_n")),
        ("C", spec.query, context("q", N, "o_n")),
    ]
    if isinstance(mask, ir.ConstDecay):
        roles.append(("log_a", mask.log_gamma, context("d", None, None)))
    elif isinstance(mask, ir.ScalarSemiseparable):
        roles.append(("log_a", mask.log_a, context("d", None, None)))
    elif isinstance(mask, ir.DiagonalSemiseparable):
        roles.append(("log_a", mask.log_a, context("d", N, "o_n")))
    roles.append(("out", _epilogue_expr(spec), context("h", P, "o_p")))
    if any(index is None for _, _, index in roles):
        return None
    try:
        return _layout(spec, [(r, x, i) for r, x, i in roles if i is not None], counts, H)
    except _Unfusable:
        return None


class _Unfusable(Exception):
    """A tensor of a role's expression has an axis the kernel does not index there."""


def _layout(
    spec: ir.Spec,
    roles: list[tuple[str, E.Expr, dict[str, str]]],
    counts: Mapping[str, ir.Size | None],
    H: str,
) -> DecodeFusion:
    bound = {d.name: E.Num(value=float(d.value)) for d in spec.dims if d.value is not None}
    positions = {t.name: k for k, t in enumerate(spec.tensors)}
    tensors: dict[str, FusedTensor] = {}
    blocks: dict[tuple[str, str], str] = {}  # (tensor, offset) → block
    loads: list[str] = []
    converts: list[str] = []
    dims: dict[str, str] = {}
    exprs: dict[str, E.Expr] = {}
    for role, expr, index in roles:
        expr = E.substitute(expr, dict(bound))
        mapping: dict[str, E.Expr] = {}
        for name in sorted(E.refs(expr)):
            if name == "@core":
                mapping[name] = E.Ref(name=_CORE)
            elif name in positions:
                mapping[name] = E.Ref(name=_load(spec.tensors[positions[name]], positions[name],
                                                 index, tensors, blocks, loads, converts))
            else:  # a dim bound at call time
                dims.setdefault(name, prefixed("fd_", name))
                mapping[name] = E.Ref(name=dims[name])
        exprs[role] = E.substitute(expr, mapping)
    names = {b: b for b in blocks.values()} | {d: d for d in dims.values()} | {_CORE: _CORE}
    emitter = Emitter(names)
    atoms = {}
    for role, expr in exprs.items():  # "out" last: its own lines follow the core's
        start = len(emitter.lines)
        atom = emitter.emit(expr)
        const = fold(expr)
        atoms[role] = f"tl.full([], {number(const)}, tl.float32)" if const is not None else atom
    return DecodeFusion(
        tensors=tuple(tensors.values()),
        dims=tuple((p, n) for n, p in dims.items()),
        groups={r: f'sizes["{identifier(c)}"]' if isinstance(c, str) else "1"
                for r, c in counts.items() if r != "d" or c is not None},
        loads=tuple(loads),
        body=(*converts, *emitter.lines[:start]),
        epilogue=tuple(emitter.lines[start:]),
        x=atoms["x"],
        B=atoms["B"],
        C=atoms["C"],
        log_a=atoms.get("log_a"),
        out=atoms["out"],
        text={r: E.show(x).replace("@core", "y").replace("@", "") for r, x, _ in roles},
    )


def _load(
    tensor: ir.Tensor,
    position: int,
    index: Mapping[str, str],
    tensors: dict[str, FusedTensor],
    blocks: dict[tuple[str, str], str],
    loads: list[str],
    converts: list[str],
) -> str:
    """The block holding `tensor` at the kernel point `index` (loaded once per offset)."""
    name = identifier(tensor.name)
    ptr = prefixed("fp_", name)
    strides, terms, vectors = [], [], []
    for k, axis in enumerate(tensor.shape):
        if not isinstance(axis, str) or axis == ir.SEQ:
            continue  # a literal-1 axis, or the one token's seq index 0
        if axis not in index:
            raise _Unfusable(f"{name} has the axis {axis}, not indexed here")
        stride = f"fs_{name}_{k}"
        strides.append((stride, k))
        terms.append(f"{index[axis]} * {stride}")
        if index[axis] in _MASKS:
            vectors.append(index[axis])
    tensors.setdefault(name, FusedTensor(position=position, ptr=ptr, strides=tuple(strides)))
    offset = " + ".join(terms) or "0"
    key = (name, offset)
    if key not in blocks:
        block = f"fb_{name}_{sum(n == name for n, _ in blocks)}"  # fb_<tensor>_<k-th load>
        blocks[key] = block
        masks = " & ".join(_MASKS[v] for v in vectors)
        other = f", mask={masks}, other=1.0" if masks else ""
        shape = {"o_n": "[BLOCK_N]", "o_p": "[BLOCK_P]"}.get(vectors[0], "") if vectors else "[]"
        loads.append(f"{block} = tl.load({ptr} + {offset}{other})  # {shape}")
        converts.append(f"{block} = {block}.to(tl.float32)")
    return blocks[key]
