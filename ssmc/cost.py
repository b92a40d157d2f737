"""Forward cost of one call in one form: tensor-core and scalar FLOPs, bytes, launches.

The planner weighs these against a device's rates (DESIGN §4). A call is its launches
in order: the prologue (ssmc.cost_roles) computes the canonical core inputs, the form's
stages run on them (ssmc.cost_forms, one model per stage template), an epilogue applies
skip and gate. Shapes, resolved sizes and the tile arithmetic are in ssmc.cost_terms.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ssmc import cost_forms, cost_roles, ir
from ssmc.cost_terms import Launch, PlanError, Shape, Sizes, quadratic_tile, sizes

__all__ = ["Cost", "Launch", "PlanError", "Shape", "cost", "quadratic_tile"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Cost:
    """What one form costs for one call: its launches in order, and the state it holds."""

    launches: tuple[Launch, ...]
    state_bytes: int
    """State memory the form holds: the running state, or every chunk's state."""

    @property
    def kernels(self) -> int:
        """Number of launches."""
        return len(self.launches)

    @property
    def matmul_flops(self) -> int:
        """Tensor-core FLOPs of all launches."""
        return sum(k.matmul_flops for k in self.launches)

    @property
    def scalar_flops(self) -> int:
        """CUDA-core FLOPs of all launches."""
        return sum(k.scalar_flops for k in self.launches)

    @property
    def flops(self) -> int:
        """All forward FLOPs, tensor-core and scalar."""
        return self.matmul_flops + self.scalar_flops

    @property
    def bytes(self) -> int:
        """HBM bytes of all launches."""
        return sum(k.bytes for k in self.launches)


def cost(checked: ir.CheckedSpec, form: ir.Form, shape: Shape, *, chunk_size: int = 64) -> Cost:
    """Forward cost of `checked` in `form` for `shape`; `chunk_size` is Q (quadratic: the tile)."""
    if form not in checked.forms:
        allowed = ", ".join(f.value for f in checked.forms)
        raise PlanError(f"form {form.value!r} is not allowed for this spec; allowed: {allowed}")
    s = sizes(checked, shape)
    mask = s.spec.mask
    if form is ir.Form.RECURRENT:
        core, held = cost_forms.recurrent(s), s.state
    elif form is ir.Form.CONVOLUTION:
        core, held = cost_forms.convolution(s), 0
    elif isinstance(mask, ir.Toeplitz):
        core, held = cost_forms.toeplitz_quadratic(s, chunk_size), 0
    elif form is ir.Form.QUADRATIC:
        core = cost_forms.quadratic(s, chunk_size)
        held = s.state if s.spec.initial_state or s.spec.final_state else 0
    elif isinstance(mask, ir.DiagonalSemiseparable):
        core = cost_forms.chunked_diagonal(s, chunk_size)
        held = cost_forms.chunk_states_bytes(s, chunk_size)
    else:
        core = cost_forms.chunked(s, chunk_size)
        held = cost_forms.chunk_states_bytes(s, chunk_size)
        epilogue = cost_roles.epilogue(s)
        if epilogue and fused_epilogue(checked):
            return Cost(
                launches=(*cost_roles.prologue(s), *_fuse(core, epilogue[0], s)), state_bytes=held
            )
    fused_decay = form is ir.Form.CHUNKED and isinstance(mask, ir.DiagonalSemiseparable)
    launches = (*cost_roles.prologue(s, fused_decay=fused_decay), *core, *cost_roles.epilogue(s))
    return Cost(launches=launches, state_bytes=held)


def fused_epilogue(checked: ir.CheckedSpec) -> bool:
    """Whether the chunked scan applies skip and gate in its store (no epilogue launch).

    The rule of `ssmc.roles.fused_epilogue`, without building the tile epilogue (the
    planner costs ~60 shapes per render; tests/test_cost.py keeps the two in step).
    """
    spec = checked.spec
    if spec.skip is None and spec.gate is None:
        return False
    head, feature = spec.output.shape[2], spec.output.shape[3]
    return not (isinstance(head, str) and head == feature)


def _fuse(core: tuple[Launch, ...], epilogue: Launch, s: Sizes) -> tuple[Launch, ...]:
    """The core with the epilogue folded into its last launch: y is neither written nor
    read back; that launch reads the skip and gate inputs and writes out instead."""
    *head, last = core
    fused = replace(
        last,
        scalar_flops=last.scalar_flops + epilogue.scalar_flops,
        bytes=last.bytes + epilogue.bytes - 2 * s.y_row * s.tokens,
    )
    return (*head, fused)
