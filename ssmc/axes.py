"""Named axes: which axes a declared tensor and an expression carry (DESIGN §3 layout)."""

from __future__ import annotations

from ssmc import expr as E
from ssmc import ir


def tensor_axes(shape: tuple[ir.Size, ...]) -> tuple[str, ...]:
    """A declared shape's named axes; literal 1s are broadcast axes and drop out."""
    return tuple(a for a in shape if isinstance(a, str))


def head_dims(spec: ir.Spec) -> frozenset[str]:
    """Dims that count heads: the output's third axis and the third axis of 4-axis inputs."""
    heads = {a for a in spec.output.shape[2:3] if isinstance(a, str)}
    for t in spec.tensors:
        if t.kind is ir.TensorKind.INPUT and len(t.shape) >= 4 and isinstance(t.shape[2], str):
            heads.add(t.shape[2])
    return frozenset(heads)


def expr_axes(expr: E.Expr, spec: ir.Spec) -> tuple[str, ...]:
    """The union of the axes an expression reads, batch and seq first, then first appearance.

    Dims referenced as values and numbers carry no axes. Unknown names raise KeyError
    (check reports them with their location before calling this).
    """
    tensors = {t.name: tensor_axes(t.shape) for t in spec.tensors}
    dims = {d.name for d in spec.dims}
    seen: list[str] = []
    for name in _refs_in_order(expr):
        if name in dims:
            continue
        for axis in tensors[name]:
            if axis not in seen:
                seen.append(axis)
    front = [a for a in (ir.BATCH, ir.SEQ) if a in seen]
    return tuple(front + [a for a in seen if a not in front])


def _refs_in_order(expr: E.Expr) -> list[str]:
    match expr:
        case E.Num():
            return []
        case E.Ref(name=name):
            return [name]
        case E.Neg(operand=operand):
            return _refs_in_order(operand)
        case E.BinOp(lhs=lhs, rhs=rhs):
            return _refs_in_order(lhs) + _refs_in_order(rhs)
        case E.Call(args=args):
            return [n for a in args for n in _refs_in_order(a)]
    raise TypeError(f"not an expression node: {expr!r}")
