"""Render kernel templates to Python+Triton source (the only module that imports jinja2).

`render_stage(name, **context)` renders one stage, `templates/<name>.py.jinja`;
`render_module(checked)` renders the whole generated module of a checked spec: the
prologue, the core stages of every form whose templates exist, the epilogue and a
`forward(**tensors)` entry point. Templates see only typed values derived from the
checked IR (through the helpers below and ssmc.expr_triton), never spec text.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from pathlib import Path

import jinja2

from ssmc import expr as E
from ssmc import ir
from ssmc.axes import expr_axes
from ssmc.expr_triton import Elementwise, Extra, Target, UnsafeNameError, elementwise, identifier
from ssmc.resources import data_dir, template_dir

MARKER = "# ssmc-generated-module"
"""The first line of every generated module: how `compile_to_file` recognises its own files."""
FORWARD_KEYWORDS = ("initial_state", "cu_seqlens", "form", "chunk_size")
_NOT_SPEC_FIELDS = frozenset({"span", "source"})


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["py"] = py_literal
    env.filters["pyshape"] = py_shape
    return env


def py_literal(value: object) -> str:
    """A Python literal of plain data: identifiers/text as strings, ints, None, tuples, dicts."""
    if value is None or isinstance(value, bool | int):
        return repr(value)
    if isinstance(value, str):
        if not value.isprintable():
            raise UnsafeNameError(f"{value!r} cannot appear in generated code")
        return repr(value).replace("'", '"') if '"' not in value else repr(value)
    if isinstance(value, tuple | list):
        items = [py_literal(v) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py_literal(k)}: {py_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Python literal for {type(value).__name__}")


def py_shape(shape: Sequence[ir.Size]) -> str:
    """A launcher's Python tuple of sizes: `sizes["H"]` for a dim, the number for a literal."""
    items = [
        f"sizes[{py_literal(identifier(a))}]" if isinstance(a, str) else str(int(a)) for a in shape
    ]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def stage_exists(name: str) -> bool:
    """Whether `templates/<name>.py.jinja` exists (a form without its stage is left out)."""
    return (template_dir() / f"{name}.py.jinja").is_file()


def render_stage(name: str, /, **context: object) -> str:
    """Render `templates/<name>.py.jinja` with `context` (StrictUndefined: all names given)."""
    return _environment().get_template(f"{identifier(name)}.py.jinja").render(**context)


# ---------------------------------------------------------------------------------------
# Identity of a spec: a stable text of the IR without source locations.
# ---------------------------------------------------------------------------------------


def stable_repr(value: object) -> str:
    """A deterministic text of IR values, spans and the source path left out."""
    if is_dataclass(value) and not isinstance(value, type):
        parts = (
            f"{f.name}={stable_repr(getattr(value, f.name))}"
            for f in fields(value)
            if f.name not in _NOT_SPEC_FIELDS
        )
        return f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, tuple | list):
        return "(" + ", ".join(stable_repr(v) for v in value) + ",)"
    if isinstance(value, float):
        return repr(value)
    if value is None or isinstance(value, bool | int | str):
        return repr(value)
    raise TypeError(f"no stable text for {type(value).__name__}")


def spec_hash(checked: ir.CheckedSpec) -> str:
    """sha256 of the checked IR without spans: equal for specs that differ only in layout."""
    return hashlib.sha256(stable_repr(checked).encode()).hexdigest()


def tool_versions() -> dict[str, str]:
    """The versions a module is generated with (part of its header and cache key)."""
    import torch
    import triton

    try:
        ssmc_version = importlib.metadata.version("ssmc")
    except importlib.metadata.PackageNotFoundError:
        from ssmc import __version__ as ssmc_version
    return {"ssmc": ssmc_version, "triton": triton.__version__, "torch": torch.__version__}


def build_digest() -> str:
    """sha256 over ssmc's sources, grammar and templates: any edit changes every cache key.

    The version number alone misses edits made between releases (a checkout in development).
    """
    package = Path(__file__).parent
    files = [
        *sorted(package.glob("*.py")),
        *sorted(template_dir().glob("*.jinja")),
        *sorted(data_dir("grammar").glob("*.lark")),
    ]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# The prologue and epilogue: which core inputs come from which expression.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Prologue:
    """The elementwise kernels of the prologue and how each core input is obtained."""

    kernels: tuple[Elementwise, ...]
    core: dict[str, str]
    """Core input role → the launcher's Python expression for it."""
    lti: dict[str, str] | None


def decay_kind(checked: ir.CheckedSpec) -> str:
    """How the core sees the decay: "none", "scalar", "diagonal", or "toeplitz"."""
    mask = checked.spec.mask
    if isinstance(mask, ir.Causal):
        return "none"
    if isinstance(mask, ir.DiagonalSemiseparable):
        return "diagonal"
    if isinstance(mask, ir.Toeplitz):
        return "toeplitz"
    return "scalar"


def prologue(checked: ir.CheckedSpec) -> Prologue:
    """Targets of the prologue grouped into kernels by iteration space, and the core inputs."""
    spec, heads = checked.spec, checked.heads
    N, P = checked.state_size, checked.head_dim
    targets: list[Target] = []
    core: dict[str, str] = {}
    lti = None

    def take(role: str, expr: E.Expr, shape: tuple[ir.Size, ...], dtype: str) -> str:
        if isinstance(expr, E.Ref) and spec.tensor(expr.name).shape == shape:
            return f"tensors[{_position(spec, expr.name)}]"
        targets.append(Target(role=role, expr=expr, shape=shape, dtype=dtype))
        return role

    mask = spec.mask
    if isinstance(mask, ir.Causal):
        core["log_a"] = "None"
    elif isinstance(mask, ir.ConstDecay):
        take("log_gamma", mask.log_gamma, (_count(heads.decay),), "torch.float32")
        core["log_a"] = 'log_gamma.view(1, 1, -1).expand(sizes["batch"], sizes["seq"], -1)'
    elif isinstance(mask, ir.ScalarSemiseparable | ir.DiagonalSemiseparable):
        per_n: tuple[ir.Size, ...] = () if isinstance(mask, ir.ScalarSemiseparable) else (N or 1,)
        shape = (ir.BATCH, ir.SEQ, _count(heads.decay), *per_n)
        core["log_a"] = take("log_a", mask.log_a, shape, "torch.float32")
    factors = checked.value_factors
    value_shape = (ir.BATCH, ir.SEQ, _count(heads.value), P)
    if factors is not None and spec.tensor(factors.base).shape == value_shape:
        core["x"] = f"tensors[{_position(spec, factors.base)}]"
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
        return Prologue(kernels=_group("prologue", spec, targets), core=core, lti=lti)
    assert spec.key is not None and spec.query is not None and N is not None
    core["B"] = take(
        "B", spec.key, (ir.BATCH, ir.SEQ, _count(heads.key), N), _dtype_of(spec, spec.key)
    )
    core["C"] = take(
        "C", spec.query, (ir.BATCH, ir.SEQ, _count(heads.query), N), _dtype_of(spec, spec.query)
    )
    core = {role: core[role] for role in ("x", "s", "log_a", "B", "C")}
    return Prologue(kernels=_group("prologue", spec, targets), core=core, lti=lti)


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
    out: E.Expr = E.Ref(name="@core")
    if spec.skip is not None:
        out = E.BinOp(op=E.Op.ADD, lhs=out, rhs=spec.skip)
    if spec.gate is not None:
        out = E.BinOp(op=E.Op.MUL, lhs=out, rhs=spec.gate)
    shape = spec.output.shape
    core = Extra(key="@core", source="y", ptr="y", block="y_blk", shape=shape)
    target = Target(role="out", expr=out, shape=shape, dtype="out.dtype")
    return elementwise("epilogue", spec, [target], [core])


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


# ---------------------------------------------------------------------------------------
# The module: stages of every available form, and the form rule.
# ---------------------------------------------------------------------------------------


def form_stage(checked: ir.CheckedSpec, form: ir.Form) -> str | None:
    """The top stage template implementing `form` for this spec (None: built into the module)."""
    if form is ir.Form.CONVOLUTION:
        return None
    decay = decay_kind(checked)
    if decay == "toeplitz":
        return "toeplitz"
    if form is ir.Form.CHUNKED and decay == "diagonal":
        return "chunked_diag"
    return form.value


def available_forms(checked: ir.CheckedSpec) -> tuple[ir.Form, ...]:
    """The forms the structure allows whose stage templates exist, in the checker's order."""
    return tuple(
        f for f in checked.forms if (stage := form_stage(checked, f)) is None or stage_exists(stage)
    )


def form_rule(
    checked: ir.CheckedSpec, forms: Sequence[ir.Form], device: str = "H100"
) -> tuple[tuple[int | None, str, int], ...]:
    """(largest T, form, chunk size) intervals: the planner's cheapest available form per T.

    The planner is asked at powers of two (batch 4, 2-byte inputs, call-time dims at 64)
    on `device`; the last interval is open (None).
    """
    if not forms:
        return ()
    from ssmc.cost import Shape
    from ssmc.plan import plan

    dims = {d.name: 64 for d in checked.spec.dims if d.value is None}
    rule: list[tuple[int | None, str, int]] = []
    for k in range(21):
        p = plan(checked, Shape(batch=4, seqlen=2**k, dims=dims), device=device)
        times = {e.form: e.time_s for e in p.estimates}
        best = p.form if p.form in forms else min(forms, key=lambda f: times[f])
        if rule and rule[-1][1] == best.value:
            rule[-1] = (2**k, best.value, p.chunk_size)
        else:
            rule.append((2**k, best.value, p.chunk_size))
    rule[-1] = (None, rule[-1][1], rule[-1][2])
    return tuple(rule)


def validate_names(spec: ir.Spec) -> None:
    """Every declared name (spec, dims, tensors, axes, output) is a plain identifier."""
    identifier(spec.name)
    identifier(spec.output.name)
    for d in spec.dims:
        identifier(d.name)
    for shape in (spec.output.shape, *(t.shape for t in spec.tensors)):
        for axis in shape:
            if isinstance(axis, str):
                identifier(axis)
    forward_params(spec)


def forward_params(spec: ir.Spec) -> tuple[str, ...]:
    """The keyword parameters of `forward`: the declared names, checked to be usable."""
    names = []
    for t in spec.tensors:
        name = identifier(t.name)
        if name in FORWARD_KEYWORDS or name.startswith("_ssmc"):
            raise UnsafeNameError(f"the tensor name {name!r} is reserved in generated modules")
        names.append(name)
    return tuple(names)


def render_module(checked: ir.CheckedSpec, *, versions: Mapping[str, str] | None = None) -> str:
    """The generated module of `checked`: header, stages, and `forward`.

    `versions` (ssmc, triton, torch) go into the header; the installed ones by default.
    """
    spec = checked.spec
    validate_names(spec)
    forms = available_forms(checked)
    decay = decay_kind(checked)
    stage_ctx = {
        "decay": decay,
        "varlen": spec.varlen,
        "initial_state": spec.initial_state,
        "final_state": spec.final_state,
        "pattern": checked.pattern.value,
    }
    pro = prologue(checked)
    epi = epilogue(checked)
    stages = [render_stage("prologue", kernels=pro.kernels, core=pro.core, lti=pro.lti)]
    if epi is not None:
        stages.append(
            render_stage(
                "epilogue", kernels=(epi,), skip=spec.skip is not None, gate=spec.gate is not None
            )
        )
    tops = [s for f in forms if (s := form_stage(checked, f)) is not None]
    decode = decay != "toeplitz" and stage_exists("decode")
    # A top stage includes its own helpers (chunked → chunked_cumsum, seq_tiles...).
    stages += [render_stage(top, **stage_ctx) for top in dict.fromkeys(tops)]
    if decode:
        stages.append(render_stage("decode", **stage_ctx))
    return render_stage(
        "module",
        marker=MARKER,
        name=spec.name,
        spec_hash=spec_hash(checked),
        versions=dict(versions or tool_versions()),
        forms=[f.value for f in forms],
        form_stages={f.value: form_stage(checked, f) for f in forms},
        rule=form_rule(checked, forms),
        params=forward_params(spec),
        shapes=[t.shape for t in spec.tensors],
        bound={d.name: d.value for d in spec.dims if d.value is not None},
        output=spec.output,
        state_size=checked.state_size,
        head_dim=checked.head_dim,
        toeplitz=decay == "toeplitz",
        decode=decode,
        initial_state=spec.initial_state,
        final_state=spec.final_state,
        varlen=spec.varlen,
        epilogue=epi is not None,
        inputs=[i for i, t in enumerate(spec.tensors) if t.kind is ir.TensorKind.INPUT],
        core=list(pro.core),
        stages=stages,
    )
