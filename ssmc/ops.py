"""The user-facing op of a spec (the only module that touches `torch.library`).

Each spec becomes one custom op `ssmc::<spec name>_<hash8>` with a fake (meta) kernel,
so `torch.compile(fullgraph=True)` traces it, and an autograd formula. `SsmcOp.__call__`
validates the tensors (ssmc.bind), asks the planner for the form on CUDA, and calls the
op. On CPU the generated kernels run under the Triton interpreter when TRITON_INTERPRET=1;
otherwise the PyTorch reference runs (said once with a warning).

Backward: the autograd formula saves the op's inputs (nothing O(T²)) and calls a second
custom op, `ssmc::<name>_backward`, with its own fake kernel (so AOTAutograd traces the
backward graph without running it). Its implementation is the generated module's `backward`
(the Triton kernels: docs/backward.md), or, where the reference runs the forward, autograd
of the PyTorch reference in fp32 (fp64 for fp64 inputs). Where the gate's gradient reads y
before the output roles (Mamba-2's z), an eager call that needs gradients asks the op to
keep it (`keep_core`, a third output as mamba_ssm keeps `out_x`); the formula then hands it
to the module's backward directly, which frees it once read, instead of running the
forward again.
"""

from __future__ import annotations

import functools
import logging
import os
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ssmc import ir
from ssmc.bind import bind, offsets_problems, size_of
from ssmc.errors import TensorError
from ssmc.expr_triton import UnsafeNameError, identifier
from ssmc.render import spec_hash
from ssmc.replay import Replay
from ssmc.roles import output_inputs

_log = logging.getLogger(__name__)
_LIBRARY = torch.library.Library("ssmc", "FRAGMENT")
_OPS: dict[str, _Registered] = {}
_SCHEMA_WORDS = frozenset(
    {
        "self",
        "out",
        "input",
        "Tensor",
        "int",
        "float",
        "str",
        "bool",
        "Scalar",
        "None",
        "SymInt",
        "Device",
        "Layout",
        "ScalarType",
        "grad_y",
        "grad_final_state",
    }
)
_warned_reference = False


class _Registered:
    """A registered op, its backward op, and the implementations they dispatch to."""

    def __init__(self, qualname: str, op: Any, backward_op: Any) -> None:
        self.qualname = qualname
        self.op = op
        self.backward_op = backward_op
        self.run: Callable[..., Any] = _unset
        self.run_backward: Callable[..., Any] = _unset
        self.keeps_core = False  # the module's KEEPS_CORE


def _unset(*args: Any) -> Any:
    raise RuntimeError("ssmc op used before its implementation was registered")


def op_name(checked: ir.CheckedSpec) -> str:
    """`<spec name>_<first 8 hex digits of the spec hash>`: one op per distinct spec."""
    return f"{identifier(checked.spec.name)}_{spec_hash(checked)[:8]}"


def schema_names(checked: ir.CheckedSpec) -> tuple[str, ...]:
    """Argument names of the op schema: the tensor names, a reserved one prefixed with `arg_`
    (again, until it is free: `out` beside a tensor `arg_out` becomes `arg_arg_out`)."""
    reserved = _SCHEMA_WORDS | {"initial_state", "cu_seqlens", "form", "chunk_size", "keep_core"}
    names = [identifier(t.name) for t in checked.spec.tensors]
    taken = set(names)
    for i, name in enumerate(names):
        if name in reserved:
            while name in taken or name in reserved:
                name = f"arg_{name}"
            taken.add(name)
            names[i] = name
    if len(set(names)) != len(names):
        raise UnsafeNameError(f"tensor names collide in the op schema: {names}")
    return tuple(names)


_OPTIONS = (
    "Tensor? initial_state=None, Tensor? cu_seqlens=None, str? form=None, int? chunk_size=None"
)


def schema(checked: ir.CheckedSpec) -> str:
    """The op schema, built only from validated identifiers: y, the final state when the spec
    declares one, and the kept core ([0] unless keep_core where the module keeps one)."""
    args = ", ".join(f"Tensor {n}" for n in schema_names(checked))
    returns = "(Tensor, Tensor, Tensor)" if checked.spec.final_state else "(Tensor, Tensor)"
    return f"({args}, {_OPTIONS}, bool keep_core=False) -> {returns}"


def backward_schema(checked: ir.CheckedSpec) -> str:
    """The backward op's schema: the gradients of the outputs, then the forward's arguments;
    it returns one gradient per tensor, then that of initial_state when one was given."""
    args = ", ".join(f"Tensor {n}" for n in schema_names(checked))
    return f"(Tensor grad_y, Tensor? grad_final_state, {args}, {_OPTIONS}) -> Tensor[]"


def register(checked: ir.CheckedSpec) -> _Registered:
    """Define `ssmc::<op_name>` once per process, with fake and autograd kernels."""
    name = op_name(checked)
    qualname = f"ssmc::{name}"
    if qualname in _OPS:
        return _OPS[qualname]
    _LIBRARY.define(name + schema(checked))
    _LIBRARY.define(f"{name}_backward" + backward_schema(checked))
    registered = _Registered(
        qualname,
        getattr(torch.ops.ssmc, name).default,
        getattr(torch.ops.ssmc, f"{name}_backward").default,
    )
    n = len(checked.spec.tensors)

    # Boxed calls drop trailing arguments left at their default: pad them back.
    def impl(*args: Any) -> Any:
        args = (*args, *(None,) * (n + 4 - len(args)), *(False,) * (n + 5 - len(args)))
        y, state, core = registered.run(*args[: n + 4], keep_core=bool(args[n + 4]))
        if core is None:
            core = y.new_empty((0,))
        return (y, state, core) if checked.spec.final_state else (y, core)

    def fake(*args: Any) -> Any:
        args = (*args, *(None,) * (n + 4 - len(args)), *(False,) * (n + 5 - len(args)))
        outputs = _empty_outputs(checked, args[:n], args[n + 1])
        y = outputs[0] if checked.spec.final_state else outputs
        kept = bool(args[n + 4]) and registered.keeps_core
        core = y.new_empty(y.shape if kept else (0,), dtype=_core_dtype(y.dtype))
        return (*outputs, core) if checked.spec.final_state else (y, core)

    def backward_impl(*args: Any) -> Any:
        return registered.run_backward(*args, *(None,) * (n + 6 - len(args)))

    def backward_fake(*args: Any) -> Any:
        tensors, initial_state = args[2 : n + 2], args[n + 2] if len(args) > n + 2 else None
        grads = [torch.empty_like(t) for t in tensors]
        return grads + ([] if initial_state is None else [torch.empty_like(initial_state)])

    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    _LIBRARY.impl(f"{name}_backward", backward_impl, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=_LIBRARY)
    torch.library.register_fake(f"{qualname}_backward", backward_fake, lib=_LIBRARY)
    torch.library.register_autograd(
        qualname,
        functools.partial(_backward, registered, n, checked.spec.final_state),
        setup_context=functools.partial(_setup_context, n),
        lib=_LIBRARY,
    )
    _OPS[qualname] = registered
    return registered


def _empty_outputs(
    checked: ir.CheckedSpec, tensors: Sequence[Tensor], cu_seqlens: Tensor | None
) -> Any:
    """Uninitialised outputs of the right shapes, dtypes and device (the meta kernel)."""
    spec = checked.spec
    by_name = {t.name: v for t, v in zip(spec.tensors, tensors, strict=True)}
    dims = bind(checked, by_name, cu_seqlens=cu_seqlens, check_values=False)
    H, P = size_of(spec.output.shape[2], dims), size_of(spec.output.shape[3], dims)
    first = tensors[0]
    y = first.new_empty((dims[ir.BATCH], dims[ir.SEQ], H, P), dtype=output_dtype(checked, tensors))
    if not spec.final_state:
        return y
    assert checked.state_size is not None
    N = size_of(checked.state_size, dims)
    states = dims[ir.BATCH] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return y, first.new_empty((states, H, N, P), dtype=torch.float32)


def _core_dtype(y_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the kept core (the module's rule): y's when 16-bit, else fp32."""
    return y_dtype if y_dtype in (torch.float16, torch.bfloat16) else torch.float32


def output_dtype(checked: ir.CheckedSpec, tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype of y: the promoted dtype of the per-token inputs carrying its feature axis."""
    return functools.reduce(
        torch.promote_types, [tensors[i].dtype for i in output_inputs(checked.spec)]
    )


def _setup_context(n: int, ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    """Keep the inputs (tensors, initial_state, cu_seqlens), the form and the chunk size; an
    unused output's gradient stays None (no zero final-state gradient is materialised).

    The kept core (output[-1]) is no autograd output: it is held on ctx, not saved, so that
    the backward can drop it once the module has read it (a saved tensor lives as long as
    the graph node)."""
    inputs = (*inputs, *(None,) * (n + 4 - len(inputs)))
    ctx.save_for_backward(*inputs[: n + 2])
    ctx.form, ctx.chunk_size = inputs[n + 2], inputs[n + 3]
    y, core = output[0], output[-1]
    ctx.mark_non_differentiable(core)
    ctx.core = core if core.numel() else None
    ctx.y_meta = (y.shape, y.dtype, y.device)
    ctx.set_materialize_grads(False)


def _backward(
    registered: _Registered, n: int, has_state: bool, ctx: Any, grad_y: Tensor | None,
    *grad_rest: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """The autograd formula: the backward op on the saved inputs; None where none is needed.
    With a kept core, the op's implementation runs directly (eagerly), handed the core in a
    list it empties, so that the core is freed as soon as it is read."""
    *tensors, initial_state, cu_seqlens = ctx.saved_tensors
    grad_state = grad_rest[0] if has_state else None
    if grad_y is None:  # only the final state was used
        shape, dtype, device = ctx.y_meta
        grad_y = torch.zeros(shape, dtype=dtype, device=device)
    args = (grad_y, grad_state, *tensors, initial_state, cu_seqlens, ctx.form, ctx.chunk_size)
    if ctx.core is not None:
        kept, ctx.core = [ctx.core], None  # a second backward (retain_graph) runs without it
        grads = registered.run_backward(*args, kept_core=kept)
    else:
        grads = registered.backward_op(*args)
    needs = ctx.needs_input_grad
    result: list[Tensor | None] = [g if needs[i] else None for i, g in enumerate(grads[:n])]
    result.append(grads[n] if initial_state is not None and needs[n] else None)
    return (*result, None, None, None, None)


def reference_gradients(
    checked: ir.CheckedSpec,
    tensors: Sequence[Tensor],
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    grad_y: Tensor,
    grad_state: Tensor | None,
) -> tuple[list[Tensor | None], Tensor | None]:
    """Gradients of the PyTorch reference (fp32, fp64 for fp64 inputs), in the inputs' dtypes."""
    from ssmc.reference import reference

    spec = checked.spec
    n = len(spec.tensors)
    with torch.enable_grad():
        leaves = [_leaf(t) for t in tensors]
        init = None if initial_state is None else _leaf(initial_state)
        y, final = reference(checked)(
            **{t.name: v for t, v in zip(spec.tensors, leaves, strict=True)},
            initial_state=init,
            cu_seqlens=cu_seqlens,
        )
        outputs, grads = [y], [grad_y]
        if final is not None and grad_state is not None:
            outputs.append(final)
            grads.append(grad_state)
        wrt = leaves + ([init] if init is not None else [])
        found = torch.autograd.grad(outputs, wrt, grads, allow_unused=True)
    result: list[Tensor | None] = [
        None if g is None else g.to(t.dtype) for g, t in zip(found[:n], tensors, strict=True)
    ]
    d_init = None
    if init is not None and initial_state is not None and found[n] is not None:
        d_init = found[n].to(initial_state.dtype)
    return result, d_init


def _leaf(t: Tensor) -> Tensor:
    return t.detach().to(torch.promote_types(t.dtype, torch.float32)).requires_grad_()


class SsmcOp:
    """A compiled spec: call it with every declared tensor by name → (y, final_state | None)."""

    def __init__(self, checked: ir.CheckedSpec, module: types.ModuleType) -> None:
        self.checked = checked
        self.module = module
        self.name = checked.spec.name
        self.forms = tuple(ir.Form(f) for f in module.FORMS)
        self.interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        self._names = tuple(t.name for t in checked.spec.tensors)
        self._seen: dict[tuple[Any, ...], _CallShape] = {}
        self._seq_from = next(
            i for i, t in enumerate(checked.spec.tensors) if t.kind is ir.TensorKind.INPUT
        )
        self._plans: dict[tuple[Any, ...], tuple[str | None, int | None, Any]] = {}
        self._backward_plans: dict[tuple[Any, ...], dict[str, Any] | None] = {}
        self._precompiled: set[tuple[Any, ...]] = set()
        # decode calls replayed per layout (ssmc.replay), where the module records launches
        # (SSMC_REPLAY=0: never)
        self._replays: dict[tuple[Any, ...], Replay] = {}
        replays = os.environ.get("SSMC_REPLAY", "1") != "0"
        self._record = getattr(module, "record", None) if replays else None
        self._registered = register(checked)
        self._registered.run = self._run
        self._registered.run_backward = self._run_backward
        self._keeps_core = bool(getattr(module, "KEEPS_CORE", False))
        self._registered.keeps_core = self._keeps_core
        self.op = self._registered.op

    @property
    def last_form(self) -> str | None:
        """The form the latest eager call ran ("decode" for a one-token recurrent step)."""
        return getattr(self.module, "LAST_FORM", None)

    def __repr__(self) -> str:
        forms = ", ".join(f.value for f in self.forms) or "none yet"
        return f"SsmcOp({self.name}, forms: {forms}, op: {self._registered.qualname})"

    def __call__(
        self,
        /,
        *,
        initial_state: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        form: ir.Form | str | None = None,
        chunk_size: int | None = None,
        **tensors: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """y [batch, seq, H, P] and the final state [batch | num_seqs, H, N, P] (or None)."""
        form_name = form.value if isinstance(form, ir.Form) else form
        if torch.compiler.is_compiling():
            # no kept core: the compiled graph's backward runs the backward op as traced
            ordered = [tensors[n] for n in self._names]
            args = (*ordered, initial_state, cu_seqlens, form_name, chunk_size)
            result = self.op(*args)[:-1]
        else:
            unforced = form_name is None and chunk_size is None  # the planner picks
            if self._replays and unforced and cu_seqlens is None:
                replayed = self._replayed(tensors, initial_state)
                if replayed is not None:
                    return self._returned(replayed)
            ordered, seen = self._checked(tensors, initial_state, cu_seqlens)
            launch = None
            if form_name is None and (ordered[0].is_cuda or self.interpreted):
                form_name, planned_chunk, launch = self._plan(ordered, cu_seqlens, seen)
                if chunk_size is not None and chunk_size != planned_chunk:
                    launch = None  # tuned tiles belong to the tuned chunk
                chunk_size = chunk_size if chunk_size is not None else planned_chunk
            args = (*ordered, initial_state, cu_seqlens, form_name, chunk_size)
            # Without autograd the dispatcher adds only overhead (~70 µs a call): run directly.
            needs_grad = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (*ordered, initial_state)
            )
            if needs_grad:
                # the module keeps y before the output roles for the backward where it reads it
                keep = self._keeps_core and (ordered[0].is_cuda or self.interpreted)
                result = self.op(*args, keep_core=keep)[:-1]
            elif (seen is not None and seen.replay_tries and unforced and cu_seqlens is None
                  and self._record is not None and self.module._FAST_LAUNCH[0]):
                result = self._run_recorded(args, launch, seen, ordered, initial_state)
            else:
                result = self._run(*args, launch=launch, seen=seen)[:-1]
        return self._returned(result)

    def _returned(self, result: Sequence[Any]) -> tuple[Tensor, Tensor | None]:
        """(y, final state) of the op's outputs; the state None where the spec has none."""
        if self.checked.spec.final_state:
            y, state = result
            return y, state
        return result[0], None

    def _run_recorded(
        self,
        args: tuple[Any, ...],
        launch: dict[str, Any] | None,
        seen: _CallShape,
        ordered: list[Tensor],
        initial_state: Tensor | None,
    ) -> tuple[Any, ...]:
        """_run with the module's launches recorded: a decode call whose launches can be
        repeated from its tensors alone is kept as a Replay for its layout (a few tries per
        signature, as a first call compiles; none for the other forms)."""
        assert self._record is not None
        result, launches = self._record(lambda: self._run(*args, launch=launch, seen=seen))
        outputs = result[:-1]
        if self.last_form != "decode":
            seen.replay_tries = 0
            return outputs
        seen.replay_tries -= 1
        inputs = (*ordered, initial_state)
        replay = None if launches is None else Replay.build(inputs, outputs, launches)
        if replay is not None:
            _bounded(self._replays)
            self._replays[_layout(ordered, initial_state)] = replay
            seen.replay_tries = 0
        return outputs

    def _replayed(
        self, tensors: dict[str, Tensor], initial_state: Tensor | None
    ) -> list[Tensor | None] | None:
        """(y, state) by the Replay of this call's layout, or None (none for it: another layout,
        gradients wanted, an unaligned input; an argument missing or not a tensor)."""
        if len(tensors) != len(self._names):
            return None
        try:
            ordered = [tensors[n] for n in self._names]
            replay = self._replays.get(_layout(ordered, initial_state))
        except (KeyError, AttributeError, TypeError, RuntimeError):  # (a tensor without storage)
            return None
        if replay is None:
            return None
        self.module.LAST_FORM = "decode"  # type: ignore[attr-defined]  # as the module sets it
        return replay((*ordered, initial_state))

    def _validate(
        self, tensors: dict[str, Tensor], initial_state: Tensor | None, cu_seqlens: Tensor | None
    ) -> list[Tensor]:
        """The tensors in declaration order; `bind` checks each new combination of metadata."""
        return self._checked(tensors, initial_state, cu_seqlens)[0]

    def _checked(
        self, tensors: dict[str, Tensor], initial_state: Tensor | None, cu_seqlens: Tensor | None
    ) -> tuple[list[Tensor], _CallShape | None]:
        """The tensors in declaration order and what is kept for the call's signature (shapes,
        dtypes, devices: all that `bind` reads but the offsets' values); None when it has none
        (a missing or non-tensor argument: bind reports it). `bind` runs once per signature."""
        try:
            ordered = [tensors[n] for n in self._names]
            signature: tuple[Any, ...] | None = (
                *[(t.size(), t.dtype, t.device) for t in ordered],
                None if initial_state is None else _meta(initial_state),
                None if cu_seqlens is None else _meta(cu_seqlens),
                len(tensors),
            )
        except (KeyError, AttributeError, TypeError):
            signature = None
        seen = None if signature is None else self._seen.get(signature)
        if seen is None:
            dims = bind(self.checked, tensors, initial_state=initial_state, cu_seqlens=cu_seqlens)
            if signature is not None:
                _bounded(self._seen)
                seen = self._seen[signature] = _CallShape()
            if cu_seqlens is not None:
                _offsets_passed(cu_seqlens, dims[ir.SEQ])
        return ordered, seen

    def _plan(
        self, ordered: list[Tensor], cu_seqlens: Tensor | None, seen: _CallShape | None = None
    ) -> tuple[str | None, int | None, Any]:
        """The autotuned (else the planner's) form, chunk and launch options for this call
        shape (cached per shape: in `seen`, what SsmcOp._checked keeps for the call's signature,
        when given)."""
        if seen is not None:
            if seen.plan is None:
                seen.plan = self._plan_uncached(ordered, cu_seqlens)
            return seen.plan
        key = (
            tuple(t.shape for t in ordered),
            ordered[0].dtype,
            None if cu_seqlens is None else cu_seqlens.shape[0],
        )
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan_uncached(ordered, cu_seqlens)
            _bounded(self._plans)
            self._plans[key] = plan
        return plan

    def _plan_uncached(
        self, ordered: list[Tensor], cu_seqlens: Tensor | None
    ) -> tuple[str | None, int | None, Any]:
        from ssmc.devices import detect
        from ssmc.plan import plan

        shape, winner = self._tuned(ordered, cu_seqlens)
        if winner is not None:  # measured on this GPU for this shape bucket (ssmc.autotune)
            return winner.form, winner.chunk_size, dict(winner.launch) or None
        if ordered[0].device.type != "cuda":
            return None, None, None  # the interpreter keeps the module's rule
        chosen = plan(self.checked, shape, device=detect())
        _log.info("%s, batch %d × T %d: planned %s, chunk %d", self.name, shape.batch,
                  shape.seqlen, chosen.form.value, chosen.chunk_size)
        if chosen.form not in self.forms:
            return None, None, None
        return chosen.form.value, chosen.chunk_size, None

    def _backward_launch(
        self, ordered: Sequence[Tensor], cu_seqlens: Tensor | None
    ) -> dict[str, Any] | None:
        """The autotuned options of the fused backward's launcher for this call shape, or None
        (cached per shape, as the forward's plan is)."""
        key = (
            tuple(t.shape for t in ordered),
            ordered[0].dtype,
            None if cu_seqlens is None else cu_seqlens.shape[0],
        )
        if key not in self._backward_plans:
            _, winner = self._tuned(list(ordered), cu_seqlens)
            _bounded(self._backward_plans)
            self._backward_plans[key] = None if winner is None else dict(winner.backward) or None
        return self._backward_plans[key]

    def _tuned(self, ordered: list[Tensor], cu_seqlens: Tensor | None) -> tuple[Any, Any]:
        """The call's cost-model shape and the autotune cache's winner for it (or None)."""
        from ssmc.autotune_cache import tuned
        from ssmc.cost import Shape

        dims = bind(
            self.checked, dict(zip(self._names, ordered, strict=True)), cu_seqlens=cu_seqlens
        )
        declared = {d.name for d in self.checked.spec.dims}
        shape = Shape(
            batch=dims[ir.BATCH],
            seqlen=max(dims[ir.SEQ], 1),
            dims={k: v for k, v in dims.items() if k in declared},
            dtype_bytes=ordered[0].element_size(),
            num_seqs=1 if cu_seqlens is None else max(cu_seqlens.shape[0] - 1, 1),
        )
        forms = tuple(f.value for f in self.forms)
        dtype = str(ordered[self._seq_from].dtype).removeprefix("torch.")
        winner = tuned(self.checked, shape, dtype=dtype, varlen=cu_seqlens is not None, forms=forms)
        return shape, winner

    def _run(
        self,
        *args: Any,
        launch: dict[str, Any] | None = None,
        seen: _CallShape | None = None,
        keep_core: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The op's implementation, (y, final state or None, kept core or None): generated
        kernels, or the reference on a plain CPU; `launch`: tuned options of the form's stage
        launcher (None through the torch.library op: the tuned ones of the call's shape then,
        when it runs their form and chunk); `seen`: what SsmcOp._checked keeps for the
        validated call's signature, where the module's setup is kept; `keep_core`: keep y
        before the output roles for the backward, where the module does (KEEPS_CORE)."""
        n = len(self._names)
        tensors, (initial_state, cu_seqlens, form, chunk_size) = args[:n], args[n:]
        if cu_seqlens is not None:
            # Validation is cached per metadata: the values are checked here, on every call
            # (eager or compiled), before anything reads them.
            check_offsets(self.checked, cu_seqlens, tensors[self._seq_from].shape[1])
        if tensors[0].is_cpu and not self.interpreted:
            y, state = self._reference(tensors, initial_state, cu_seqlens, form)
            # its backward is the reference's: a kept core would not be read (zeros, as the
            # fake's shape has it)
            kept = keep_core and self._keeps_core
            return y, state, torch.zeros_like(y, dtype=_core_dtype(y.dtype)) if kept else None
        if initial_state is not None and initial_state.dtype != torch.float32:
            initial_state = initial_state.float()  # the kernels carry the state in fp32
        tensors = tuple(tensors)
        if launch is None and seen is None and form is not None:
            # Through the torch.library op (autograd, torch.compile) no launch options come
            # with the call: the autotuned ones of this shape apply when the call runs the
            # tuned form and chunk (cached per shape, as for eager calls).
            planned_form, planned_chunk, planned_launch = self._plan(list(tensors), cu_seqlens)
            if (planned_form, planned_chunk) == (form, chunk_size):
                launch = planned_launch
        setup = None
        fresh = seen is None  # a signature seen before has had its kind precompiled
        if seen is not None:
            # The module's sizes, form and chunk depend on the metadata only: bound once per
            # call signature (bind has checked it), not again on every call.
            setup = seen.setups.get((form, chunk_size))
            if setup is None:
                fresh = True
                setup = self.module._ssmc_setup(tensors, initial_state, cu_seqlens, form, chunk_size)
                seen.setups[form, chunk_size] = setup

        keep_core = keep_core and self._keeps_core

        def forward() -> Any:
            result = self.module._ssmc_run(
                tensors, initial_state, cu_seqlens, form, chunk_size, launch, setup,
                keep_core=keep_core,
            )
            return result if keep_core else (*result, None)

        if fresh:
            frozen = None if launch is None else tuple(sorted(launch.items()))
            self._precompile(
                ("forward", form, chunk_size, frozen, keep_core),
                tensors, initial_state, cu_seqlens, forward,
            )
        y, state, core = forward()
        return y, state, core

    def _precompile(
        self,
        kind: tuple[Any, ...],
        tensors: Sequence[Tensor],
        initial_state: Tensor | None,
        cu_seqlens: Tensor | None,
        call: Any,
    ) -> None:
        """Before the first call of a kind (direction, form, chunk, launch options, dtypes,
        optional inputs, device) on a GPU: `call` once with its kernels compiled side by side
        and none launched (the module's `precompile`), so a cold start compiles in parallel.
        Later calls of the kind skip this; a kernel a later shape specialises anew compiles
        at its launch, as without it. Not while a CUDA graph is being captured: the run's
        torch work would be captured with it."""
        if self.interpreted or not tensors[0].is_cuda:
            return
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return
        key = (
            *kind,
            tuple(t.dtype for t in tensors),
            initial_state is None,
            cu_seqlens is None,
            tensors[0].device,
        )
        try:
            if key in self._precompiled:
                return
        except TypeError:  # unhashable launch options: no precompile
            return
        self._precompiled.add(key)
        precompile = getattr(self.module, "precompile", None)
        if precompile is None:
            return
        try:
            precompile(call)
        except Exception as exc:  # noqa: BLE001 — the real call reports any error itself
            _log.debug("%s: precompile failed (%s); kernels compile at their launch", self.name,
                       exc)

    def _run_backward(
        self,
        grad_y: Tensor,
        grad_state: Tensor | None,
        *args: Any,
        kept_core: list[Tensor] | None = None,
    ) -> list[Tensor]:
        """The backward op's implementation: gradients of every tensor (then of initial_state,
        when given) from the generated backward, or from the reference where it ran.
        kept_core: [the forward's kept core], emptied by the module's backward (None: none
        kept)."""
        n = len(self._names)
        tensors, (initial_state, cu_seqlens, form, chunk_size) = args[:n], args[n:]
        reference_path = tensors[0].device.type == "cpu" and not self.interpreted
        if reference_path or not hasattr(self.module, "backward"):
            grads, d_init = reference_gradients(
                self.checked, tensors, initial_state, cu_seqlens, grad_y, grad_state
            )
        else:
            launch_bwd = self._backward_launch(tensors, cu_seqlens)

            def backward(kept: list[Tensor] | None) -> Any:
                return self.module.backward(
                    **dict(zip(self._names, tensors, strict=True)),
                    initial_state=None if initial_state is None else initial_state.float(),
                    cu_seqlens=cu_seqlens,
                    form=form,
                    chunk_size=chunk_size,
                    grad_y=grad_y,
                    grad_final_state=grad_state,
                    kept_core=kept,
                    launch_bwd=launch_bwd,
                )

            self._precompile(
                ("backward", form, chunk_size, grad_y.dtype, grad_state is None, bool(kept_core),
                 tuple(sorted((launch_bwd or {}).items()))),
                tensors, initial_state, cu_seqlens,
                lambda: backward(None if kept_core is None else list(kept_core)),  # its own list
            )
            grads, d_init = backward(kept_core)
        result = [
            torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors, strict=True)
        ]
        if initial_state is not None:
            zero = d_init is None
            result.append(
                torch.zeros_like(initial_state) if zero else d_init.to(initial_state.dtype)
            )
        return result

    def _reference(
        self,
        tensors: Sequence[Tensor],
        initial_state: Tensor | None,
        cu_seqlens: Tensor | None,
        form: str | None,
    ) -> tuple[Tensor, Tensor | None]:
        from ssmc.reference import reference

        global _warned_reference
        if not _warned_reference:
            _warned_reference = True
            warnings.warn(
                "ssmc: CPU tensors without TRITON_INTERPRET=1 run the PyTorch "
                "reference, not the generated kernels",
                RuntimeWarning,
                stacklevel=4,
            )
        y, state = reference(self.checked, form)(
            **dict(zip(self._names, tensors, strict=True)),
            initial_state=initial_state,
            cu_seqlens=cu_seqlens,
        )
        return y.contiguous(), None if state is None else state.contiguous()


class _CallShape:
    """What an op keeps for one validated call signature: the plan (form, chunk, launch
    options) and the module's setup (sizes, number of states, form, chunk) per requested
    (form, chunk size)."""

    __slots__ = ("plan", "setups", "replay_tries")

    def __init__(self) -> None:
        self.plan: tuple[str | None, int | None, Any] | None = None
        self.setups: dict[tuple[str | None, int | None], Any] = {}
        self.replay_tries = _REPLAY_TRIES  # decode calls recorded before giving up (SsmcOp._run_recorded)


_REPLAY_TRIES = 3
"""A first call compiles (Triton's path, not replayable) and a second may still meet a new
launch key: recording stops after this many decode calls of a signature."""


def _layout(ordered: Sequence[Tensor], initial_state: Tensor | None) -> tuple[Any, ...]:
    """A Replay's key: what its launches depend on (each tensor's shape, strides, dtype, device
    and 16-byte alignment, and the current CUDA device, whose stream and kernels the runners
    use) and whether the call wants gradients (each tensor's requires_grad under grad mode).
    A replay is recorded for aligned inputs without gradients only: any other key misses.
    (The spec's tensors are a fixed number: one entry more says initial_state was given.)"""
    grad = torch.is_grad_enabled()
    tensors = ordered if initial_state is None else (*ordered, initial_state)
    return (
        tuple([(t.shape, t.stride(), t.dtype, t.device, grad and t.requires_grad,
                t.data_ptr() & 15) for t in tensors]),
        torch.cuda.current_device() if ordered[0].is_cuda else None,
    )


def _meta(t: Tensor) -> tuple[Any, ...]:
    return (t.size(), t.dtype, t.device)


_CACHE_ENTRIES = 4096
"""Entries an op keeps per cache (validated signatures, plans) before starting over:
call shapes that keep changing (new lengths every call) must not grow them without end."""


def _bounded(cache: set[Any] | dict[Any, Any]) -> None:
    if len(cache) >= _CACHE_ENTRIES:
        cache.clear()


_PASSED: tuple[weakref.ref[Tensor], int, int] | None = None
"""The latest cu_seqlens whose values passed, its version counter and seq: the layers of a
model called with the same offsets read them from the device once, not once per layer."""


def check_offsets(checked: ir.CheckedSpec, cu_seqlens: Tensor, seq: int) -> None:
    """TensorError unless cu_seqlens runs from 0 to seq, non-decreasing (its values: one small
    copy to the host, which waits for the device, unless this very tensor, unchanged since,
    passed last; nothing while a CUDA graph is being captured)."""
    last, version = _PASSED, _version(cu_seqlens)
    if last is not None and last[0]() is cu_seqlens and last[1:] == (version, seq):
        return
    if cu_seqlens.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    problems = offsets_problems(cu_seqlens.tolist(), seq)
    if problems:
        raise TensorError(
            f"{len(problems)} problem(s) with the tensors for {checked.spec.name}:\n  "
            + "\n  ".join(problems)
        )
    _offsets_passed(cu_seqlens, seq)


def _offsets_passed(cu_seqlens: Tensor, seq: int) -> None:
    global _PASSED
    version = _version(cu_seqlens)
    if version >= 0:
        _PASSED = (weakref.ref(cu_seqlens), version, seq)


def _version(t: Tensor) -> int:
    """The tensor's version counter (bumped by every in-place write); −1 where it has none
    (inference tensors), so that such offsets are read on every call."""
    try:
        return int(t._version)
    except RuntimeError:
        return -1
