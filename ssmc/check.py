"""check: `Spec` → `CheckedSpec`, or a CheckError listing every inconsistency found.

Checks names, shapes, the axes of every role expression, head counts (each divides H),
and derives what later passes need: allowed forms, head pattern, N, P, value factors.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field

from ssmc import algebra, ir
from ssmc import expr as E
from ssmc.axes import expr_axes, head_dims, tensor_axes
from ssmc.errors import CheckError, Diagnostic
from ssmc.expr import Span
from ssmc.reserved import CALL_KEYWORDS, is_reserved_tensor_name

FORMS_BY_MASK: dict[type, tuple[ir.Form, ...]] = {
    ir.Causal: (ir.Form.RECURRENT, ir.Form.QUADRATIC, ir.Form.CHUNKED),
    ir.ConstDecay: (ir.Form.RECURRENT, ir.Form.QUADRATIC, ir.Form.CHUNKED),
    ir.ScalarSemiseparable: (ir.Form.RECURRENT, ir.Form.QUADRATIC, ir.Form.CHUNKED),
    ir.DiagonalSemiseparable: (ir.Form.RECURRENT, ir.Form.CHUNKED),
    ir.Toeplitz: (ir.Form.QUADRATIC, ir.Form.CONVOLUTION),
}


@dataclass
class _Checker:
    spec: ir.Spec
    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(message=message, span=span, hint=hint))


def check(spec: ir.Spec, *, text: str | None = None) -> ir.CheckedSpec:
    """Validate a lowered spec and derive its facts; raise CheckError with all problems."""
    if algebra.needs_algebra(spec):  # mask algebra, quasiseparable (docs/variants.md)
        return algebra.check_algebra(spec, text=text)
    c = _Checker(spec)
    _check_reserved(c)
    _check_shapes(c)
    if not c.diagnostics:
        _check_names(c)
    if c.diagnostics:
        raise CheckError(c.diagnostics, source=spec.source, text=text)
    heads = head_dims(spec)
    output_heads, head_dim = spec.output.shape[2], spec.output.shape[3]
    roles = _check_roles(c, heads, head_dim)
    _check_unused(c)
    if c.diagnostics:
        raise CheckError(c.diagnostics, source=spec.source, text=text)
    counts = ir.HeadCounts(output=output_heads, query=roles.get("query"), key=roles.get("key"),
                           value=roles.get("value") or 1,
                           decay=roles.get("decay"))
    _check_divides(c, counts)
    if c.diagnostics:
        raise CheckError(c.diagnostics, source=spec.source, text=text)
    return ir.CheckedSpec(
        spec=spec,
        forms=FORMS_BY_MASK[type(spec.mask)],
        heads=counts,
        pattern=_pattern(spec, counts),
        state_size=_state_size(spec, heads),
        head_dim=head_dim,
        value_factors=_value_factors(spec, head_dim),
    )


def _check_reserved(c: _Checker) -> None:
    """Tensors become keyword arguments of the op and `forward`: theirs are taken."""
    for tensor in c.spec.tensors:
        if is_reserved_tensor_name(tensor.name):
            c.error(f"`{tensor.name}` cannot name a tensor", tensor.span,
                    "the generated op and module use it (" + ", ".join(CALL_KEYWORDS)
                    + ", grad_y, grad_final_state, launch, names starting with _ssmc); "
                    "pick another name")


def _check_shapes(c: _Checker) -> None:
    spec = c.spec
    dims = {d.name for d in spec.dims}
    for tensor in spec.tensors:
        _check_shape(c, tensor.name, tensor.shape, tensor.span, dims)
        per_token = tensor.kind is ir.TensorKind.INPUT
        if per_token and tuple(tensor.shape[:2]) != (ir.BATCH, ir.SEQ):
            c.error(f"input `{tensor.name}` must start with [batch, seq]", tensor.span,
                    "inputs are per token: `input x : [batch, seq, H, P]`; "
                    "use `param` for weights")
        if not per_token and (ir.BATCH in tensor.shape or ir.SEQ in tensor.shape):
            c.error(f"param `{tensor.name}` cannot have a batch or seq axis", tensor.span,
                    "declare per-token tensors with `input`")
    out = spec.output
    _check_shape(c, out.name, out.shape, out.span, dims)
    if len(out.shape) != 4 or tuple(out.shape[:2]) != (ir.BATCH, ir.SEQ):
        c.error(f"output `{out.name}` must have the shape [batch, seq, H, P]", out.span,
                "H is the number of output heads and P the head dim")
    elif not isinstance(out.shape[2], str):
        c.error("the output's head axis must be a dim", out.span, "declare `dim H` and use H")


def _check_shape(c: _Checker, name: str, shape: tuple[ir.Size, ...], span: Span | None,
                 dims: set[str]) -> None:
    seen: set[str] = set()
    for axis in shape:
        if not isinstance(axis, str):
            continue
        if axis not in dims and axis not in (ir.BATCH, ir.SEQ):
            near = difflib.get_close_matches(axis, sorted(dims) + [ir.BATCH, ir.SEQ], n=1)
            hint = f"did you mean `{near[0]}`? " if near else ""
            c.error(f"shape of `{name}` uses `{axis}`, which is not a declared dim", span,
                    hint + f"declare it: `dim {axis}` (bound at call time) or `dim {axis} = 64`")
        if axis in seen:
            c.error(f"shape of `{name}` repeats the axis `{axis}`", span,
                    "axes are matched by name, so each appears once per tensor")
        seen.add(axis)


def _role_exprs(spec: ir.Spec) -> list[tuple[str, E.Expr]]:
    """Every expression of the spec with the name of the role it plays."""
    found: list[tuple[str, E.Expr]] = []
    for role in ("query", "key", "value", "skip", "gate"):
        value = getattr(spec, role)
        if value is not None:
            found.append((role, value))
    mask = spec.mask
    if isinstance(mask, ir.ConstDecay):
        found.append(("decay", mask.log_gamma))
    elif isinstance(mask, ir.ScalarSemiseparable | ir.DiagonalSemiseparable):
        found.append(("decay", mask.log_a))
    elif isinstance(mask, ir.Toeplitz):
        kernel = mask.kernel
        if isinstance(kernel, ir.LearnedKernel):
            found.append(("kernel", kernel.kernel))
        else:
            for part in ("A", "B", "C", "dt"):
                value = getattr(kernel, part)
                if value is not None:
                    found.append((f"lti {part}", value))
    return found


def _check_names(c: _Checker) -> None:
    spec = c.spec
    known = {t.name for t in spec.tensors} | {d.name for d in spec.dims}
    for _, value in _role_exprs(spec):
        for ref in _walk_refs(value):
            if ref.name not in known:
                near = difflib.get_close_matches(ref.name, sorted(known), n=1)
                hint = f"did you mean `{near[0]}`? " if near else ""
                c.error(f"`{ref.name}` is used but never declared", ref.span,
                        hint + f"declare it, e.g. `input {ref.name} : [batch, seq, H]` "
                        f"or `param {ref.name} : [H]`")


def _walk_refs(expr: E.Expr) -> list[E.Ref]:
    match expr:
        case E.Num():
            return []
        case E.Ref():
            return [expr]
        case E.Neg(operand=operand):
            return _walk_refs(operand)
        case E.BinOp(lhs=lhs, rhs=rhs):
            return _walk_refs(lhs) + _walk_refs(rhs)
        case E.Call(args=args):
            return [r for a in args for r in _walk_refs(a)]
    raise TypeError(f"not an expression node: {expr!r}")


def _check_roles(c: _Checker, heads: frozenset[str], head_dim: ir.Size) -> dict[str, ir.Size | None]:
    """Check each role's axes; return each role's head count (dim name or 1)."""
    spec = c.spec
    counts: dict[str, ir.Size | None] = {}
    is_toeplitz = isinstance(spec.mask, ir.Toeplitz)
    if is_toeplitz:
        for role in ("query", "key"):
            if getattr(spec, role) is not None:
                c.error(f"a Toeplitz mask has no `{role}`", _span_of(getattr(spec, role)),
                        "M = L for Toeplitz masks: drop the query and key")
        for flag in ("initial_state", "final_state"):
            if getattr(spec, flag):
                c.error(f"a Toeplitz mask has no finite state, so no `{flag}`", spec.mask.span,
                        f"drop `{flag}`")
    else:
        for role in ("query", "key"):
            if getattr(spec, role) is None:
                c.error(f"the spec declares no `{role}`", spec.mask.span,
                        "a semiseparable, diagonal, causal or const_decay mask needs "
                        "`query C` and `key B`")
    state_axes: dict[str, str] = {}
    for role, value in _role_exprs(spec):
        axes = expr_axes(value, spec)
        role_heads = [a for a in axes if a in heads]
        if len(role_heads) > 1:
            c.error(f"the {role} mixes the head dims {' and '.join(role_heads)}",
                    _span_of(value), "one expression reads one head grouping")
            continue
        count: ir.Size = role_heads[0] if role_heads else 1
        rest = [a for a in axes if a not in heads and a not in (ir.BATCH, ir.SEQ)]
        per_token = ir.BATCH in axes or ir.SEQ in axes
        if role in ("query", "key"):
            _need_token(c, role, value, axes)
            if len(rest) != 1:
                c.error(f"the {role} must have one state axis (N) besides batch, seq and "
                        f"heads; it has {_axes_text(rest)}", _span_of(value),
                        f"e.g. `input {role[0].upper()} : [batch, seq, G, N]`")
            else:
                state_axes[role] = rest[0]
            counts[role] = count
        elif role == "value":
            _need_token(c, role, value, axes)
            want = [head_dim] if isinstance(head_dim, str) else []
            if rest != want:
                c.error(f"the value must have the output's head dim axis "
                        f"{_axes_text(want)} besides batch, seq and heads; it has "
                        f"{_axes_text(rest)}", _span_of(value),
                        "value is X: [batch, seq, heads, P] with P the output's last axis")
            counts[role] = count
        elif role in ("skip", "gate"):
            output_heads = spec.output.shape[2]
            allowed = {head_dim} if isinstance(head_dim, str) else set()
            if count not in (1, output_heads) or not set(rest) <= allowed:
                c.error(f"the {role} must broadcast to the output [batch, seq, "
                        f"{output_heads}, {head_dim}]; it has axes {_axes_text(list(axes))}",
                        _span_of(value), f"e.g. `{role} {'D * x' if role == 'skip' else 'silu(z)'}`")
        elif role == "decay":
            counts[role] = count
            _check_decay(c, value, axes, rest, per_token, state_axes)
        elif role == "kernel":
            counts["decay"] = count
            if per_token or len(rest) != 1:
                c.error(f"a Toeplitz kernel has a head axis and one lag axis (L); it has "
                        f"{_axes_text(list(axes))}", _span_of(value),
                        "e.g. `param K : [H, L]`, `mask toeplitz(kernel = K)`")
        else:
            earlier = counts.get("decay")
            if earlier not in (None, 1) and count not in (1, earlier):
                c.error(f"the {role} has heads {count} but another LTI part has {earlier}",
                        _span_of(value), "A, B, C and dt of one LTI kernel share one head dim")
            elif count != 1:
                counts["decay"] = count
            elif earlier is None:
                counts["decay"] = 1
            _check_lti_part(c, role, value, per_token, rest, state_axes)
    if "query" in state_axes and "key" in state_axes and state_axes["query"] != state_axes["key"]:
        c.error(f"query and key have different state axes ({state_axes['query']} and "
                f"{state_axes['key']})", _span_of(spec.key), "both are [batch, seq, G, N]")
    return counts


def _check_decay(c: _Checker, value: E.Expr, axes: tuple[str, ...], rest: list[str],
                 per_token: bool, state_axes: dict[str, str]) -> None:
    mask = c.spec.mask
    span = _span_of(value)
    if isinstance(mask, ir.ConstDecay):
        if per_token or rest:
            c.error(f"a constant decay is one number per head; it has axes "
                    f"{_axes_text(list(axes))}", span,
                    "use `mask semiseparable(...)` for a data-dependent decay")
    elif isinstance(mask, ir.ScalarSemiseparable):
        if rest:
            c.error(f"a semiseparable decay is a scalar per (batch, seq, head); it also has "
                    f"{_axes_text(rest)}", span, "use `mask diagonal(...)` for one decay per state dim")
    elif isinstance(mask, ir.DiagonalSemiseparable):
        n = state_axes.get("key") or state_axes.get("query")
        if rest != [n]:
            c.error(f"a diagonal decay has one value per state dim {n}; it has "
                    f"{_axes_text(rest)}", span,
                    "e.g. `mask diagonal(log_a = dt * A)` with `param A : [H, N]`")


def _check_lti_part(c: _Checker, role: str, value: E.Expr, per_token: bool, rest: list[str],
                    state_axes: dict[str, str]) -> None:
    span = _span_of(value)
    part = role.split()[1]
    if per_token:
        c.error(f"the LTI `{part}` is time-invariant: it cannot have batch or seq axes", span,
                "declare it as a `param`")
        return
    if part == "dt":
        if rest:
            c.error(f"the LTI `dt` is one step per head; it has {_axes_text(rest)}", span,
                    "e.g. `param log_dt : [H]` and `dt = exp(log_dt)`")
        return
    if len(rest) != 1:
        c.error(f"the LTI `{part}` must have one state axis (N) besides heads; it has "
                f"{_axes_text(rest)}", span,
                "A is diagonal [H, N]; for a dense A use `hippo = legs|legt|lagt`")
        return
    n = state_axes.setdefault("lti", rest[0])
    if rest[0] != n:
        c.error(f"the LTI `{part}` has state axis {rest[0]} but another part has {n}", span,
                "A, B and C share one state axis")


def _need_token(c: _Checker, role: str, value: E.Expr, axes: tuple[str, ...]) -> None:
    if ir.BATCH not in axes or ir.SEQ not in axes:
        c.error(f"the {role} must vary over batch and seq", _span_of(value),
                f"the {role} reads an `input` declared [batch, seq, ...]")


def _check_unused(c: _Checker) -> None:
    used = set().union(*(E.refs(v) for _, v in _role_exprs(c.spec)))
    for tensor in c.spec.tensors:
        if tensor.name not in used:
            c.error(f"`{tensor.name}` is declared but never used", tensor.span,
                    "use it in a role or mask, or remove it")


def _check_divides(c: _Checker, counts: ir.HeadCounts) -> None:
    spec = c.spec
    output = counts.output
    bound = {d.name: d.value for d in spec.dims}
    total = bound.get(output) if isinstance(output, str) else output
    for role, count in (("query", counts.query), ("key", counts.key), ("value", counts.value),
                        ("decay", counts.decay)):
        if count is None or count == output:
            continue
        size = bound.get(count) if isinstance(count, str) else count
        if size is None or total is None:
            continue
        if total % size:
            label = {"query": "C (query)", "key": "B (key)", "value": "X (value)",
                     "decay": "the decay"}[role]
            c.error(f"{label} has {size} heads, which does not divide {output} = {total}",
                    _role_span(spec, role),
                    f"every head count divides {output}; pick {_divisors(total)}")


def _role_span(spec: ir.Spec, role: str) -> Span | None:
    if role in ("query", "key", "value"):
        return _span_of(getattr(spec, role))
    return spec.mask.span


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


def _pattern(spec: ir.Spec, counts: ir.HeadCounts) -> ir.HeadPattern:
    bound = {d.name: d.value for d in spec.dims}

    def full(count: ir.Size | None) -> bool:
        if count is None or count == counts.output:
            return True
        size = bound.get(count) if isinstance(count, str) else count
        return size is not None and size == bound.get(str(counts.output))

    if isinstance(spec.mask, ir.Toeplitz):
        return ir.HeadPattern.MHA if full(counts.value) else ir.HeadPattern.GROUPED
    q, k, v = full(counts.query), full(counts.key), full(counts.value)
    match (q, k, v):
        case (True, True, True):
            return ir.HeadPattern.MHA
        case (True, False, False):
            return ir.HeadPattern.MQA
        case (False, True, False):
            return ir.HeadPattern.MKA
        case (False, False, True):
            return ir.HeadPattern.MVA
    return ir.HeadPattern.GROUPED


def _state_size(spec: ir.Spec, heads: frozenset[str]) -> ir.Size | None:
    mask = spec.mask
    source = spec.key
    if isinstance(mask, ir.Toeplitz):
        if isinstance(mask.kernel, ir.LearnedKernel):
            return None
        source = mask.kernel.C
    assert source is not None
    rest = [a for a in expr_axes(source, spec) if a not in heads and a not in (ir.BATCH, ir.SEQ)]
    return rest[0] if rest else 1


def _value_factors(spec: ir.Spec, head_dim: ir.Size) -> ir.ValueFactors | None:
    """Split value = base · scale with base a bare tensor carrying P and scale free of P."""
    terms = _product_terms(spec.value)
    if terms is None:
        return None
    p_axis = head_dim if isinstance(head_dim, str) else None

    def has_p(term: E.Expr) -> bool:
        return p_axis is not None and p_axis in expr_axes(term, spec)

    def is_token_tensor(term: E.Expr) -> bool:
        if not isinstance(term, E.Ref) or term.name not in {t.name for t in spec.tensors}:
            return False
        return spec.tensor(term.name).kind is ir.TensorKind.INPUT

    with_p = [t for t in terms if has_p(t)] if p_axis else [t for t in terms if is_token_tensor(t)][:1]
    if len(with_p) != 1 or not is_token_tensor(with_p[0]):
        return None
    base = with_p[0]
    assert isinstance(base, E.Ref)
    if tensor_axes(spec.tensor(base.name).shape)[:2] != (ir.BATCH, ir.SEQ):
        return None
    others = [t for t in terms if t is not base]
    scale: E.Expr | None = None
    for term in others:
        scale = term if scale is None else E.BinOp(op=E.Op.MUL, lhs=scale, rhs=term)
    return ir.ValueFactors(base=base.name, scale=scale)


def _product_terms(expr: E.Expr) -> list[E.Expr] | None:
    if isinstance(expr, E.BinOp) and expr.op is E.Op.MUL:
        lhs, rhs = _product_terms(expr.lhs), _product_terms(expr.rhs)
        return None if lhs is None or rhs is None else lhs + rhs
    return [expr]


def _span_of(value: E.Expr | None) -> Span | None:
    return None if value is None else value.span


def _axes_text(axes: Sequence[ir.Size]) -> str:
    return "[" + ", ".join(str(a) for a in axes) + "]" if axes else "no such axis"
