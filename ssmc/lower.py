"""lower: syntax tree → `Spec` (frozen IR), lets inlined, every node carrying its span.

Lowering gives statements their meaning (mask names, keyword arguments, functions);
consistency across statements (shapes, heads, names) is `check`'s job.
"""

from __future__ import annotations

import difflib
import enum
import keyword
import math
from dataclasses import dataclass, field
from typing import Any, TypeVar

import lark

from ssmc import algebra_lower, ir
from ssmc import expr as E
from ssmc.errors import Diagnostic, LowerError
from ssmc.expr import Span
from ssmc.parse import KEYWORDS

_EnumT = TypeVar("_EnumT", bound=enum.Enum)

MAX_EXPR_DEPTH = 48
MAX_EXPR_NODES = 4096
MAX_DIM_VALUE = 1 << 24
MAX_INT_DIGITS = 18
RESERVED_NAMES = (frozenset({ir.BATCH, ir.SEQ, "inf"}) | frozenset(E.FUNC_NAMES)
                  | frozenset(KEYWORDS))

MASK_KWARGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # mask name: (required-one-of groups joined by |, optional)
    "causal": ((), ()),
    "const_decay": (("gamma|log_gamma",), ()),
    "semiseparable": (("a|log_a",), ()),
    "diagonal": (("a|log_a",), ()),
    "toeplitz": (("kernel",), ()),
    "lti": (("C", "dt"), ("A", "B", "hippo", "discretize")),
}


def span_of(node: lark.Tree | lark.Token) -> Span | None:
    """The source span of a tree node or token (None when lark has no position)."""
    if isinstance(node, lark.Token):
        if node.line is None or node.column is None:
            return None
        return Span(
            line=node.line,
            column=node.column,
            end_line=node.end_line or node.line,
            end_column=node.end_column or node.column + len(node),
        )
    meta = node.meta
    if getattr(meta, "empty", True):
        return None
    return Span(line=meta.line, column=meta.column, end_line=meta.end_line,
                end_column=meta.end_column)


@dataclass
class _Lowering:
    """Mutable state of one lowering: declarations seen so far and the problems found."""

    diagnostics: list[Diagnostic] = field(default_factory=list)
    names: dict[str, Span | None] = field(default_factory=dict)
    lets: dict[str, E.Expr] = field(default_factory=dict)
    dims: list[ir.Dim] = field(default_factory=list)
    tensors: list[ir.Tensor] = field(default_factory=list)
    output: ir.Output | None = None
    mask: ir.Mask | None = None
    roles: dict[str, E.Expr] = field(default_factory=dict)
    role_spans: dict[str, Span | None] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    mask_seen: bool = False

    def error(self, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(message=message, span=span, hint=hint))


def lower(tree: lark.Tree, *, source: str = "<string>", text: str | None = None) -> ir.Spec:
    """Turn a parsed `.ssm` tree into a `Spec`; raise LowerError listing every problem."""
    state = _Lowering()
    header, *statements = _kids(tree)
    assert isinstance(header, lark.Tree)
    name_token = _kids(header)[0]
    _declare_name(state, str(name_token), span_of(name_token), what="spec")
    for statement in statements:
        _statement(state, statement)
    if not state.mask_seen:
        state.error("the spec declares no mask", None,
                    "add e.g. `mask semiseparable(log_a = dt * A)` or `mask causal`")
    if state.output is None:
        state.error("the spec declares no output", None,
                    "add `output y : [batch, seq, H, P]`")
    if "value" not in state.roles:
        state.error("the spec declares no value", None, "add `value x`")
    if state.diagnostics:
        raise LowerError(state.diagnostics, source=source, text=text)
    assert state.output is not None
    if state.mask is None:
        raise LowerError(state.diagnostics, source=source, text=text)
    return ir.Spec(
        name=str(name_token),
        dims=tuple(state.dims),
        tensors=tuple(state.tensors),
        output=state.output,
        mask=state.mask,
        query=state.roles.get("query"),
        key=state.roles.get("key"),
        value=state.roles["value"],
        skip=state.roles.get("skip"),
        gate=state.roles.get("gate"),
        initial_state="initial_state" in state.flags,
        final_state="final_state" in state.flags,
        varlen="varlen" in state.flags,
        source=source,
        span=span_of(tree),
    )


def _kids(node: lark.Tree | lark.Token) -> list[Any]:
    """A syntax node's children; lark types them loosely, the grammar fixes what they are."""
    assert isinstance(node, lark.Tree)
    return list(node.children)


def _statement(state: _Lowering, node: lark.Tree) -> None:
    kind = node.data
    if kind == "dim_stmt":
        for item in _kids(node):
            name_token, value_token = _kids(item)
            size = None
            if value_token is not None:
                size = _small_int(value_token)
                if size is None or not 1 <= size <= MAX_DIM_VALUE:
                    state.error(f"dim {name_token} = {_int_text(value_token)} is out of range",
                                span_of(value_token), f"dims lie in 1 … {MAX_DIM_VALUE}"
                                + ("" if size is not None else
                                   f", written with at most {MAX_INT_DIGITS} digits"))
            if _declare_name(state, str(name_token), span_of(name_token), what="dim"):
                state.dims.append(ir.Dim(name=str(name_token), value=size,
                                         span=span_of(item)))
    elif kind == "tensor_stmt":
        kind_token, name_token, shape_node = _kids(node)
        shape = _shape(state, shape_node)
        if _declare_name(state, str(name_token), span_of(name_token), what="tensor"):
            state.tensors.append(ir.Tensor(name=str(name_token),
                                           kind=ir.TensorKind(str(kind_token)),
                                           shape=shape, span=span_of(node)))
    elif kind == "output_stmt":
        name_token, shape_node = _kids(node)
        shape = _shape(state, shape_node)
        if state.output is not None:
            state.error("the output is declared twice", span_of(node),
                        "a spec has one output")
        elif _declare_name(state, str(name_token), span_of(name_token), what="output"):
            state.output = ir.Output(name=str(name_token), shape=shape, span=span_of(node))
    elif kind == "let_stmt":
        name_token, value_node = _kids(node)
        value = _expr(state, value_node)
        if _declare_name(state, str(name_token), span_of(name_token), what="let"):
            state.lets[str(name_token)] = value
    elif kind == "mask_algebra_stmt" and _syntax_deeper_than(node.children[0], MAX_EXPR_DEPTH):
        # algebra_lower recurses once per `+`/`*`: measure first, as for expressions.
        state.mask_seen = True
        state.error(f"mask expression nested deeper than {MAX_EXPR_DEPTH} levels",
                    span_of(node), "a mask combines a few basic masks")
    elif kind == "mask_algebra_stmt" or kind == "mask_stmt" and algebra_lower.handles(node):
        algebra_lower.lower_mask(state, node)  # mask algebra, quasiseparable (docs/variants.md)
    elif kind == "mask_stmt":
        _mask(state, node)
    elif kind == "role_stmt":
        role_token, value_node = _kids(node)
        role = str(role_token)
        value = _expr(state, value_node)
        if role in state.roles:
            state.error(f"`{role}` is given twice", span_of(node),
                        f"keep one `{role}` statement")
        else:
            state.roles[role] = value
            state.role_spans[role] = span_of(node)
    elif kind == "flag_stmt":
        flag = str(_kids(node)[0])
        if flag in state.flags:
            state.error(f"`{flag}` is given twice", span_of(node), "keep one")
        state.flags.add(flag)


def _declare_name(state: _Lowering, name: str, span: Span | None, *, what: str) -> bool:
    if name in RESERVED_NAMES or keyword.iskeyword(name) or name.startswith("__"):
        state.error(f"`{name}` cannot name a {what}", span,
                    "it is reserved (a built-in axis, function, constant or Python keyword); "
                    "pick another name")
        return False
    if name in state.names:
        earlier = state.names[name]
        where = f" (first declared on line {earlier.line})" if earlier else ""
        state.error(f"`{name}` is declared twice{where}", span, "give each declaration its own name")
        return False
    state.names[name] = span
    return True


def _shape(state: _Lowering, node: lark.Tree) -> tuple[ir.Size, ...]:
    axes: list[ir.Size] = []
    for axis in _kids(node):
        token = _kids(axis)[0]
        if axis.data == "axis_int":
            value = _small_int(token)
            if value is None:
                state.error(f"literal size {_int_text(token)} in a shape", span_of(token),
                            f"only 1 may be written as a number, with at most "
                            f"{MAX_INT_DIGITS} digits; declare a dim and use its name")
            elif value != 1:
                state.error(f"literal size {value} in a shape", span_of(token),
                            f"only 1 may be written as a number; declare `dim X = {value}` "
                            "and use X")
            axes.append(1)
        else:
            axes.append(str(token))
    return tuple(axes)


def _expr(state: _Lowering, node: lark.Tree | lark.Token) -> E.Expr:
    """Build an expression node, inlining lets; errors are recorded, a placeholder returned."""
    if _syntax_deeper_than(node, MAX_EXPR_DEPTH):
        # Checked on the syntax tree first, without recursion: building (and every later
        # pass) recurses once per level. Each syntax level is one expression level or more.
        state.error(f"expression nested deeper than {MAX_EXPR_DEPTH} levels once its lets are "
                    "inlined", span_of(node), "simplify it: lets are expanded in place")
        return E.Num(value=0.0, span=span_of(node))
    result = _build_expr(state, node)
    size, depth = _size_and_depth(result, {})
    if size > MAX_EXPR_NODES:
        state.error(f"expression has {size} terms once its lets are inlined; the limit is "
                    f"{MAX_EXPR_NODES}", span_of(node), "simplify it: lets are expanded in place")
        return E.Num(value=0.0, span=span_of(node))
    if depth > MAX_EXPR_DEPTH:
        state.error(f"expression nested deeper than {MAX_EXPR_DEPTH} levels once its lets are "
                    "inlined", span_of(node), "simplify it: lets are expanded in place")
        return E.Num(value=0.0, span=span_of(node))
    return result


_NESTING = frozenset({"neg", "add", "sub", "mul", "div", "pow", "call", "mask_add", "mask_mul"})
"""Syntax nodes one level above their children (leaves, mask atoms and their arguments,
measured on their own, are not)."""


def _syntax_deeper_than(node: lark.Tree | lark.Token, limit: int) -> bool:
    """Whether an expression's (or a mask algebra's) syntax tree has more than `limit`
    levels (iterative walk)."""
    stack: list[tuple[lark.Tree | lark.Token, int]] = [(node, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, lark.Tree) and item.data in _NESTING:
            start = 1 if item.data == "call" else 0
            stack.extend((kid, depth + 1) for kid in item.children[start:] if kid is not None)
    return False


def _small_int(token: lark.Token) -> int | None:
    """The value of an INT token, or None when it is written with more than MAX_INT_DIGITS
    digits (leading zeros count: nobody writes 5000 of them; keeps `int()` away from
    Python's limit on digits)."""
    return int(token) if len(token) <= MAX_INT_DIGITS else None


def _int_text(token: lark.Token) -> str:
    """An INT token for a message: long ones cut, with their length."""
    text = str(token)
    return text if len(text) <= 24 else f"{text[:12]}…{text[-4:]} ({len(text)} digits)"


def _size_and_depth(expr: E.Expr, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """Tree size and depth of an expression whose inlined lets share subtrees (memoised)."""
    key = id(expr)
    if key in memo:
        return memo[key]
    match expr:
        case E.Num() | E.Ref():
            result = (1, 1)
        case E.Neg(operand=operand):
            size, depth = _size_and_depth(operand, memo)
            result = (size + 1, depth + 1)
        case E.BinOp(lhs=lhs, rhs=rhs):
            (ls, ld), (rs, rd) = _size_and_depth(lhs, memo), _size_and_depth(rhs, memo)
            result = (ls + rs + 1, max(ld, rd) + 1)
        case E.Call(args=args):
            parts = [_size_and_depth(a, memo) for a in args]
            result = (sum(p[0] for p in parts) + 1, max((p[1] for p in parts), default=0) + 1)
        case _:
            raise TypeError(f"not an expression node: {expr!r}")
    memo[key] = result
    return result


def _build_expr(state: _Lowering, node: lark.Tree | lark.Token) -> E.Expr:
    span = span_of(node)
    data = node.data if isinstance(node, lark.Tree) else None
    if data == "number":
        value = float(_kids(node)[0])
        if math.isinf(value):
            state.error("number too large", span, "numbers must be finite; write `inf` for ∞")
            value = 0.0
        return E.Num(value=value, span=span)
    if data == "ref":
        name = str(_kids(node)[0])
        if name == "inf":
            return E.Num(value=math.inf, span=span)
        if name in state.lets:
            return state.lets[name]
        return E.Ref(name=name, span=span)
    if data == "neg":
        return E.Neg(operand=_build_expr(state, _kids(node)[0]), span=span)
    if data in ("add", "sub", "mul", "div", "pow"):
        op = {"add": E.Op.ADD, "sub": E.Op.SUB, "mul": E.Op.MUL, "div": E.Op.DIV,
              "pow": E.Op.POW}[data]
        lhs, rhs = _kids(node)
        return E.BinOp(op=op, lhs=_build_expr(state, lhs), rhs=_build_expr(state, rhs),
                       span=span)
    if data == "call":
        name_token, *arg_nodes = _kids(node)
        args = tuple(_build_expr(state, a) for a in arg_nodes if a is not None)
        name = str(name_token)
        try:
            func = E.Func(name)
        except ValueError:
            near = difflib.get_close_matches(name, E.FUNC_NAMES, n=1)
            hint = f"did you mean `{near[0]}`? " if near else ""
            state.error(f"unknown function `{name}`", span_of(name_token),
                        hint + "functions: " + ", ".join(E.FUNC_NAMES))
            return E.Num(value=0.0, span=span)
        arity = E.FUNC_ARITY[func]
        if len(args) != arity:
            state.error(f"`{name}` takes {arity} argument{'s' if arity > 1 else ''}, "
                        f"got {len(args)}", span,
                        "clamp(x, lo, hi); min(a, b); max(a, b); others take one")
            return E.Num(value=0.0, span=span)
        return E.Call(func=func, args=args, span=span)
    raise AssertionError(f"unexpected syntax node {node!r}")


def _mask(state: _Lowering, node: lark.Tree) -> None:
    name_token, args_node = _kids(node)
    name = str(name_token)
    span = span_of(node)
    errors_before = len(state.diagnostics)
    if state.mask_seen:
        state.error("the mask is declared twice", span, "a spec has one mask")
        return
    state.mask_seen = True
    if name not in MASK_KWARGS:
        near = difflib.get_close_matches(name, list(MASK_KWARGS), n=1, cutoff=0.5)
        hint = f"did you mean `{near[0]}`? " if near else ""
        state.error(f"unknown mask `{name}`", span_of(name_token),
                    hint + "masks: " + ", ".join(MASK_KWARGS))
        return
    kwargs: dict[str, E.Expr] = {}
    kwarg_spans: dict[str, Span | None] = {}
    raw: dict[str, lark.Tree] = {}
    for kwarg in (_kids(args_node) if args_node is not None else []):
        if not isinstance(kwarg, lark.Tree):
            continue
        key_token, value_node = _kids(kwarg)
        key = str(key_token)
        if key in kwargs:
            state.error(f"`{key}` is given twice", span_of(key_token), "keep one")
            continue
        raw[key] = value_node
        kwarg_spans[key] = span_of(key_token)
        if not (name == "lti" and key in ("hippo", "discretize")):
            kwargs[key] = _expr(state, value_node)
        else:
            kwargs[key] = E.Num(value=0.0)
    required, optional = MASK_KWARGS[name]
    allowed = {k for group in required for k in group.split("|")} | set(optional)
    for key in kwargs:
        if key not in allowed:
            near = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.5)
            hint = f"did you mean `{near[0]}`? " if near else ""
            state.error(f"`{name}` takes no argument `{key}`", kwarg_spans[key],
                        hint + ("it takes " + ", ".join(sorted(allowed)) if allowed
                                else "it takes no arguments"))
    for group in required:
        options = group.split("|")
        given = [k for k in options if k in kwargs]
        if not given:
            state.error(f"`{name}` needs " + " or ".join(f"`{o}`" for o in options), span,
                        f"e.g. `mask {name}({options[0]} = ...)`")
        elif len(given) > 1:
            state.error(f"`{name}` takes only one of {', '.join(options)}",
                        kwarg_spans[given[1]], "keep one")
    if len(state.diagnostics) > errors_before:
        return
    if name == "causal":
        state.mask = ir.Causal(span=span)
    elif name == "const_decay":
        state.mask = ir.ConstDecay(log_gamma=_log_of(kwargs, "gamma", "log_gamma"), span=span)
    elif name == "semiseparable":
        state.mask = ir.ScalarSemiseparable(log_a=_log_of(kwargs, "a", "log_a"), span=span)
    elif name == "diagonal":
        state.mask = ir.DiagonalSemiseparable(log_a=_log_of(kwargs, "a", "log_a"), span=span)
    elif name == "toeplitz":
        kernel = ir.LearnedKernel(kernel=kwargs["kernel"], span=kwarg_spans["kernel"])
        state.mask = ir.Toeplitz(kernel=kernel, span=span)
    elif name == "lti":
        state.mask = _lti(state, kwargs, raw, kwarg_spans, span)


def _log_of(kwargs: dict[str, E.Expr], plain: str, log_name: str) -> E.Expr:
    """The log-decay from `log_a = e` directly, or from `a = e` as log(e) (log(exp(u)) = u)."""
    if log_name in kwargs:
        return kwargs[log_name]
    value = kwargs[plain]
    if isinstance(value, E.Call) and value.func is E.Func.EXP:
        return value.args[0]
    return E.Call(func=E.Func.LOG, args=(value,), span=value.span)


def _enum_arg(state: _Lowering, raw: dict[str, lark.Tree], key: str, enum_type: type[_EnumT],
              spans: dict[str, Span | None]) -> _EnumT | None:
    """A bare word naming a member of `enum_type` (`hippo = legs`), or an error."""
    node = raw[key]
    choices = [m.value for m in enum_type]
    if isinstance(node, lark.Tree) and node.data == "ref":
        word = str(_kids(node)[0])
        if word in choices:
            return enum_type(word)
        near = difflib.get_close_matches(word, choices, n=1)
        hint = f"did you mean `{near[0]}`? " if near else ""
    else:
        word, hint = "this expression", ""
    state.error(f"`{key}` must be one of {', '.join(choices)}, not {word}", spans[key],
                hint + f"e.g. `{key} = {choices[0]}`")
    return None


def _lti(state: _Lowering, kwargs: dict[str, E.Expr], raw: dict[str, lark.Tree],
         spans: dict[str, Span | None], span: Span | None) -> ir.Toeplitz | None:
    hippo = _enum_arg(state, raw, "hippo", ir.Hippo, spans) if "hippo" in raw else None
    if "discretize" in raw:
        discretization = _enum_arg(state, raw, "discretize", ir.Discretization, spans)
    else:
        discretization = ir.Discretization.BILINEAR if hippo else ir.Discretization.ZOH
    if hippo is not None:
        for key in ("A", "B"):
            if key in kwargs:
                state.error(f"`{key}` is given by `hippo = {hippo.value}`", spans[key],
                            f"drop `{key}` or drop `hippo`")
    elif "hippo" not in raw:
        for key in ("A", "B"):
            if key not in kwargs:
                state.error(f"`lti` needs `{key}` (or `hippo = legs|legt|lagt`)", span,
                            "e.g. `mask lti(A = A, B = Bp, C = Cp, dt = exp(log_dt))`")
    if discretization is None:
        return None
    kernel = ir.LtiKernel(A=kwargs.get("A"), B=kwargs.get("B"), C=kwargs["C"], dt=kwargs["dt"],
                          hippo=hippo, discretization=discretization, span=span)
    return ir.Toeplitz(kernel=kernel, span=span)
