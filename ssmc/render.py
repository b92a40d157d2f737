"""Render kernel templates to Python+Triton source (the only module that imports jinja2).

`render_stage(name, **context)` renders one stage, `templates/<name>.py.jinja`;
`render_module(checked)` renders the whole generated module of a checked spec: the
prologue, the core stages of every form whose templates exist, the epilogue, a
`forward(**tensors)` entry point, and the backward (the elementwise gradient stages, the
adjoint of the core, `backward(**tensors, grad_y, grad_final_state)`). Templates see only
typed values derived from the checked IR (through the helpers below, ssmc.roles and
ssmc.elementwise), never spec text.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import math
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from enum import Enum
from pathlib import Path

import jinja2

from ssmc import ir
from ssmc.decode_fusion import decode_fusion
from ssmc.elementwise import Backward, Elementwise
from ssmc.expr_triton import UnsafeNameError, identifier
from ssmc.resources import data_dir, template_dir
from ssmc.roles import (
    Prologue,
    epilogue,
    epilogue_backward,
    fused_epilogue,
    output_inputs,
    prologue,
    prologue_backward,
    skip_fold,
)

MARKER = "# ssmc-generated-module"
"""The first line of every generated module: how `compile_to_file` recognises its own files."""
FORWARD_KEYWORDS = (
    "initial_state",
    "cu_seqlens",
    "form",
    "chunk_size",
    "grad_y",
    "grad_final_state",
)
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
# The module: stages of every available form, and the form rule.
# ---------------------------------------------------------------------------------------


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

    The planner is asked at powers of two (batch 4, 2-byte inputs, call-time dims from
    `planning_dims`) on `device`; the last interval is open (None).
    """
    if not forms:
        return ()
    from ssmc.cost import Shape
    from ssmc.plan import plan

    dims = planning_dims(checked)
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


def planning_dims(checked: ir.CheckedSpec) -> dict[str, int]:
    """Values for the dims bound at call time that a call could have: 64, except head counts,
    which must divide H as the bound ones do (a call-time H is the least multiple of 64 that
    the bound group counts divide; a call-time group count the largest divisor of H ≤ 64)."""
    spec = checked.spec
    dims = {d.name: 64 for d in spec.dims if d.value is None}
    known = {d.name: d.value for d in spec.dims if d.value is not None}
    counts = checked.heads
    groups = {
        g
        for g in (counts.query, counts.key, counts.value, counts.decay)
        if g is not None and g != counts.output
    }
    fixed = [g if isinstance(g, int) else known[g] for g in groups if g not in dims]
    H = counts.output
    if isinstance(H, str) and H in dims:
        dims[H] = math.lcm(64, *fixed)
    heads = H if isinstance(H, int) else dims.get(H, known.get(H, 64))
    for g in groups:
        if isinstance(g, str) and g in dims:
            dims[g] = max(d for d in range(1, min(heads, 64) + 1) if heads % d == 0)
    return dims


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


TILED_STAGES = frozenset({"chunked", "chunked_diag", "quadratic"})
"""Stages that include seq_tiles (the tile table, the split walks' helpers) when rendered
alone; a module renders it once for all of them (their `shared_tiles`)."""


def render_module(checked: ir.CheckedSpec, *, versions: Mapping[str, str] | None = None) -> str:
    """The generated module of `checked`: header, stages, and `forward`.

    `versions` (ssmc, triton, torch) go into the header; the installed ones by default.
    """
    if checked.pieces:  # mask algebra: each piece has its own module (ssmc.algebra_ops)
        from ssmc.errors import SsmcError

        raise SsmcError(f"{checked.spec.name} has a composite mask: it runs as "
                        f"{len(checked.pieces)} ops ({', '.join(p.spec.name for p in checked.pieces)}); "
                        "render or compile each of `checked.pieces`")
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
    tops = [s for f in forms if (s := form_stage(checked, f)) is not None]
    # log a of a diagonal decay is evaluated inside the chunked forward's cumsum
    fused_decay = pro.fused_decay if "chunked_diag" in tops else None
    names = {k.name for k in pro.kernels}
    stages = [
        render_stage(
            "prologue", kernels=pro.kernels, core=pro.core, lti=pro.lti,
            fused_decay=fused_decay is not None, chunked_kernels=pro.chunked_kernels,
            chunked_query=pro.chunked_query if fused_decay is not None else None,
            chunked_only=[k for k in pro.chunked_kernels if k.name not in names],
        )
    ]
    if fused_decay is not None:
        stages.append(render_stage("chunked_diag_decay", **_decay_context(fused_decay)))
    if epi is not None:
        stages.append(
            render_stage(
                "epilogue", kernels=(epi,), skip=spec.skip is not None, gate=spec.gate is not None
            )
        )
    decode = decay != "toeplitz" and stage_exists("decode")
    # A top stage includes its own helpers (chunked → chunked_cumsum, seq_tiles...).
    # The chunked scan applies the output roles in its store (out written once, no y).
    tile_epi = fused_epilogue(checked) if "chunked" in tops else None
    # once for every tiled stage below (a diagonal spec's backward renders the scalar chunked
    # forward too)
    if TILED_STAGES & set(tops) or (forms and decay == "diagonal"):
        stages.append(render_stage("seq_tiles"))
    stages += [
        render_stage(top, **stage_ctx, **({"tile_epilogue": tile_epi} if top == "chunked" else {}),
                     shared_tiles=True)
        for top in dict.fromkeys(tops)
    ]
    # The one-token step in one launch where its roles can be rendered into the decode kernel
    # (ssmc.decode_fusion); otherwise prologue kernels, decode and epilogue launch in turn.
    decode_fused = decode_fusion(checked) if decode else None
    if decode:
        stages.append(render_stage("decode", **stage_ctx, fused=decode_fused))
    # The backward: SMAs 2 and 3 of a diagonal decay need a scalar-decay forward.
    trains = bool(forms) and (decay != "diagonal" or stage_exists("chunked"))
    # x's gradient through a skip scale ⊙ x is left to the core's backward (its dX̄ store)
    fold = skip_fold(checked, pro) if trains and decay != "toeplitz" else None
    epi_bwd = epilogue_backward(checked, fold) if trains else None
    if trains:
        stages += _backward_stages(checked, pro, epi_bwd, stage_ctx)
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
        decode_fused=decode_fused is not None,
        initial_state=spec.initial_state,
        final_state=spec.final_state,
        varlen=spec.varlen,
        epilogue=epi is not None,
        inputs=list(output_inputs(spec)),
        fused_epilogue=tile_epi is not None,
        fused_decay=fused_decay is not None,
        core=list(pro.core),
        stages=stages,
        trains=trains,
        fused_bwd=trains and fused_backward(checked),
        backward_stage=backward_path(checked),
        decay=decay,
        const_decay=isinstance(spec.mask, ir.ConstDecay),
        lti=pro.lti is not None,
        passthrough=pro.passthrough,
        skip_fold=None if fold is None else {"x": fold.x, "scale": fold.scale},
        epilogue_reads_y=epi_bwd is not None and "y" in epi_bwd.kernel.extra_args,
    )


def _decay_context(kernel: Elementwise) -> dict[str, object]:
    """The chunked_diag_decay template's context: the log a kernel, each column index as the
    cumsum program has it (its decay group `i_d`, its state dims `o_n`), each operand's load
    mask and Gd's size."""
    result = kernel.results[0]
    *group, last = kernel.cols
    # the decay group is one index per program: a [1] block, so a tensor without N (Mamba-1's
    # dt) loads as a [BLOCK_T, 1] column and what only it reads is computed once per token
    cols = [(c, "tl.zeros([1], tl.int64) + i_d", "[1]") for c in group]
    cols.append((last, "o_n", "[BLOCK_N]"))
    per_n = f"{last.index}[None, :]"
    masks = [
        o.mask if per_n in o.offset else ("m_r[:, None]" if "o_r[:, None]" in o.offset else None)
        for o in kernel.operands
    ]
    count = result.shape[2]
    return {
        "kernel": kernel,
        "cols": cols,
        "masks": masks,
        "group": f'sizes["{identifier(count)}"]' if isinstance(count, str) else str(count),
    }


def backward_path(checked: ir.CheckedSpec) -> str:
    """The stage the module's core backward runs for 16/32-bit inputs: "chunked_bwd" (a scalar
    or no decay with the chunked form), "chunked_diag_bwd" (a diagonal decay with the chunked
    form), else "adjoint" (the three-SMA core_backward / toeplitz_backward, which fp64 inputs
    always take)."""
    decay = decay_kind(checked)
    if ir.Form.CHUNKED not in available_forms(checked):
        return "adjoint"
    if decay in ("scalar", "none"):
        return "chunked_bwd"
    if decay == "diagonal" and stage_exists("chunked_diag_bwd"):
        return "chunked_diag_bwd"
    return "adjoint"


def fused_backward(checked: ir.CheckedSpec) -> bool:
    """Whether the module's backward is a fused chunked one (`backward_path` not "adjoint")."""
    return backward_path(checked) != "adjoint"


def _backward_stages(
    checked: ir.CheckedSpec,
    pro: Prologue,
    epi_bwd: Backward | None,
    stage_ctx: Mapping[str, object],
) -> list[str]:
    """The stages only the backward uses: elementwise gradients, the adjoint, the fused
    chunked backward of `backward_path`, and the scalar-decay chunked forward of a diagonal
    spec (core_backward's SMAs 2 and 3, for fp64 inputs)."""
    spec = checked.spec
    pro_bwd = prologue_backward(checked, pro)
    stages = [
        render_stage(
            "prologue_bwd", kernels=[b.kernel for b in pro_bwd], backward=pro_bwd, lti=pro.lti
        )
    ]
    if spec.skip is not None or spec.gate is not None:
        stages.append(
            render_stage(
                "epilogue_bwd",
                kernels=[] if epi_bwd is None else [epi_bwd.kernel],
                backward=epi_bwd,
                skip=spec.skip is not None,
                gate=spec.gate is not None,
            )
        )
    stages.append(render_stage("adjoint"))
    path = backward_path(checked)
    if path == "chunked_bwd":
        stages.append(render_stage("chunked_bwd", decay=stage_ctx["decay"]))
    elif path == "chunked_diag_bwd":  # reads the chunked_diag stage's cumsum, intra, seq_tiles
        stages.append(render_stage("chunked_diag_bwd"))
    if stage_ctx["decay"] == "diagonal":
        stages.append(render_stage("chunked", **{**stage_ctx, "decay": "scalar"},
                                   shared_tiles=True))
    return stages
