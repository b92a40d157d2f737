"""Lowering of the mask algebra: `mask A * B`, `mask c * A`, `mask A + B`, `quasiseparable`.

`ssmc.lower` hands every `mask_algebra_stmt` and every `mask quasiseparable(...)` here. The
result is the mask as written (`ir.MaskProduct`, `ir.MaskScale`, `ir.MaskSum`,
`ir.Quasiseparable` over the basic kinds); `ssmc.algebra` rewrites it when checking.
A factor that is a bare name but no mask kind is a scale: a param, a let or a dim.
"""

from __future__ import annotations

from typing import Any

import lark

from ssmc import expr as E
from ssmc import ir
from ssmc.expr import Span

QUASISEPARABLE_ARGS = ("a", "log_a", "a_backward", "log_a_backward")
"""`quasiseparable(a | log_a [, a_backward | log_a_backward])`."""


def handles(node: lark.Tree) -> bool:
    """Whether this statement is the algebra's: an algebra statement or `mask quasiseparable`."""
    if node.data == "mask_algebra_stmt":
        return True
    return node.data == "mask_stmt" and str(node.children[0]) == "quasiseparable"


def lower_mask(state: Any, node: lark.Tree) -> None:
    """Lower an algebra statement into `state.mask` (state is ssmc.lower's `_Lowering`)."""
    from ssmc.lower import span_of

    if state.mask_seen:
        state.error("the mask is declared twice", span_of(node), "a spec has one mask")
        return
    state.mask_seen = True
    errors_before = len(state.diagnostics)
    body = node if node.data == "mask_stmt" else node.children[0]
    if node.data == "mask_stmt":
        body = lark.Tree("mask_atom", list(node.children), meta=node.meta)
    mask = _build(state, body)
    if len(state.diagnostics) == errors_before and mask is not None:
        state.mask = mask


def _build(state: Any, node: lark.Tree) -> ir.MaskExpr | None:
    from ssmc.lower import span_of

    span = span_of(node)
    if node.data in ("mask_add", "mask_mul"):
        parts = [_build(state, kid) for kid in node.children]
        if any(p is None for p in parts):
            return None
        if node.data == "mask_add":
            terms: list[ir.MaskExpr] = []
            for p in parts:
                terms += list(p.terms) if isinstance(p, ir.MaskSum) else [p]  # type: ignore[arg-type, union-attr]
            return ir.MaskSum(terms=tuple(terms), span=span)
        factors: list[ir.MaskExpr] = []
        for p in parts:
            factors += list(p.factors) if isinstance(p, ir.MaskProduct) else [p]  # type: ignore[arg-type, union-attr]
        return ir.MaskProduct(factors=tuple(factors), span=span)
    if node.data == "mask_number":
        from ssmc.lower import _expr

        return ir.MaskScale(value=_expr(state, lark.Tree("number", node.children, meta=node.meta)),
                            span=span)
    assert node.data == "mask_atom", node.data
    name_token, args_node = node.children
    name = str(name_token)
    if name == "quasiseparable":
        return _quasiseparable(state, node, args_node, span)
    from ssmc.lower import MASK_KWARGS

    if name not in MASK_KWARGS and args_node is None:
        # A bare name that is no mask kind: a per-head constant factor (param, let, dim).
        if name in state.lets:
            return ir.MaskScale(value=state.lets[name], span=span)
        return ir.MaskScale(value=E.Ref(name=name, span=span_of(name_token)), span=span)
    return _basic(state, node)


def _basic(state: Any, node: lark.Tree) -> ir.Mask | None:
    """A basic mask kind, lowered by ssmc.lower's own mask rules on a scratch state."""
    from ssmc.lower import _Lowering, _mask

    scratch = _Lowering(diagnostics=state.diagnostics, names=state.names, lets=state.lets)
    _mask(scratch, node)
    return scratch.mask


def _quasiseparable(state: Any, node: lark.Tree, args_node: lark.Tree | None,
                    span: Span | None) -> ir.Quasiseparable | None:
    """`quasiseparable(log_a = E[, log_a_backward = F])`: the backward decay defaults to E."""
    from ssmc.lower import _expr, _log_of, span_of

    kwargs: dict[str, E.Expr] = {}
    for kwarg in (args_node.children if args_node is not None else []):
        if not isinstance(kwarg, lark.Tree):
            continue
        key_token, value_node = kwarg.children
        key = str(key_token)
        if key not in QUASISEPARABLE_ARGS:
            state.error(f"`quasiseparable` takes no argument `{key}`", span_of(key_token),
                        "it takes " + ", ".join(QUASISEPARABLE_ARGS))
            continue
        if key in kwargs:
            state.error(f"`{key}` is given twice", span_of(key_token), "keep one")
            continue
        kwargs[key] = _expr(state, value_node)
    for plain, log in (("a", "log_a"), ("a_backward", "log_a_backward")):
        if plain in kwargs and log in kwargs:
            state.error(f"`quasiseparable` takes only one of {plain}, {log}", span, "keep one")
            return None
    if "a" not in kwargs and "log_a" not in kwargs:
        state.error("`quasiseparable` needs `a` or `log_a`", span,
                    "e.g. `mask quasiseparable(log_a = delta * A)`")
        return None
    forward = _log_of(kwargs, "a", "log_a")
    if "a_backward" in kwargs or "log_a_backward" in kwargs:
        backward = _log_of(kwargs, "a_backward", "log_a_backward")
    else:
        backward = forward
    return ir.Quasiseparable(
        forward=ir.ScalarSemiseparable(log_a=forward, span=span),
        backward=ir.ScalarSemiseparable(log_a=backward, span=span),
        span=span,
    )
