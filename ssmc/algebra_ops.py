"""The op of a composite mask: its pieces' ops (each generated as today), combined in torch.

- sum `A + B`: y = Σ_k op_k(x, …); the state is the terms' states stacked along N,
  [batch, H, K·N, P] (term k owns rows k·N … (k+1)·N − 1), in and out;
- quasiseparable: y = op_fwd(x) + flip(op_bwd(flip(x))) − diag(C_i·B_i) X̄_i (both passes
  hold the diagonal once), inputs flipped along seq, params as they are;
- decayed Toeplitz window: taps[h, d] = K[h, d]·exp(d·log γ_h) evaluated in torch, then the
  Toeplitz op with the taps as its kernel.
Then skip and gate, once, on the sum. A sum whose terms share query, key and value (no
per-term scale, scalar decays) runs instead as ONE op with K·H heads (`ssmc.algebra_fuse`):
x, B and C are loaded once, by head group. Gradients flow through the registered ops
(their generated backward) and torch autograd for the glue.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ssmc import algebra_fuse, ir
from ssmc.algebra_fuse import fused_checked
from ssmc.bind import bind, size_of
from ssmc.errors import TensorError
from ssmc.expr_torch import evaluate, squeeze_literals


class _Modules:
    """The pieces' generated modules seen as one: setting an attribute sets it on each."""

    def __init__(self, modules: list[Any]) -> None:
        object.__setattr__(self, "_modules", modules)
        object.__setattr__(self, "_shadowed", {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._modules[0], name)

    def __setattr__(self, name: str, value: Any) -> None:
        missing = object()
        for i, m in enumerate(self._modules):
            self._shadowed.setdefault((i, name), getattr(m, name, missing))
            setattr(m, name, value)
        self._shadowed.setdefault(("missing", name), missing)

    def __delattr__(self, name: str) -> None:
        """Undo __setattr__: each module gets back what it held before (pytest's monkeypatch
        deletes an attribute it did not find on this object itself)."""
        missing = self._shadowed.pop(("missing", name), None)
        for i, m in enumerate(self._modules):
            old = self._shadowed.pop((i, name), missing)
            if old is missing:
                if hasattr(m, name):
                    delattr(m, name)
            else:
                setattr(m, name, old)


class CompositeOp:
    """A composite spec's op: call it like `SsmcOp` → (y, final_state | None)."""

    def __init__(self, checked: ir.CheckedSpec, *,
                 cache_dir: str | os.PathLike[str] | None = None,
                 pieces: list[Any] | None = None, fuse: bool = True) -> None:
        """`pieces`: callables to run instead of the generated ops (ReferencePiece): one for
        a fused sum, else one per piece; `fuse=False` runs a sum one op per term."""
        from ssmc.load import load

        self.checked = checked
        self.name = checked.spec.name
        self.fused = fused_checked(checked) if fuse else None
        if pieces is not None and len(pieces) != 1:
            self.fused = None
        specs = [self.fused] if self.fused is not None else list(checked.pieces)
        self.pieces = pieces or [load(p, cache_dir=cache_dir) for p in specs]
        self.forms = tuple(f for f in checked.forms if all(f in p.forms for p in self.pieces))
        self.module = _Modules([getattr(p, "module", None) for p in self.pieces])
        self.interpreted = getattr(self.pieces[0], "interpreted", False)

    @property
    def last_form(self) -> str | None:
        """The form the latest call of the first piece ran."""
        return getattr(self.pieces[0], "last_form", None)

    def __repr__(self) -> str:
        parts = " + ".join(p.name for p in self.pieces)
        return f"CompositeOp({self.name} = {parts}, forms: {', '.join(f.value for f in self.forms)})"

    def __call__(
        self,
        *,
        initial_state: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        form: ir.Form | str | None = None,
        chunk_size: int | None = None,
        **tensors: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """y [batch, seq, H, P] and the final state (stacked per term for a sum), or None."""
        spec = self.checked.spec
        dims = bind(self.checked, tensors, cu_seqlens=cu_seqlens)
        options = {"cu_seqlens": cu_seqlens, "form": form, "chunk_size": chunk_size}
        mask = spec.mask
        state: Tensor | None = None
        if isinstance(mask, ir.Quasiseparable) or _is_qs(mask):
            y = self._bidirectional(tensors, options)
        elif isinstance(mask, ir.Toeplitz):
            y = self._decayed_toeplitz(tensors, dims, options)
        else:
            y, state = self._sum(tensors, dims, initial_state, options)
        y = self._epilogue(y, tensors, dims)
        return y, state if spec.final_state else None

    # ---------------------------------------------------------------- kinds

    def _call(self, k: int, tensors: Mapping[str, Tensor], **options: Any) -> tuple[Tensor, Tensor | None]:
        piece = self.pieces[k]
        names = [t.name for t in piece.checked.spec.tensors]
        return piece(**{n: tensors[n] for n in names if n in tensors}, **options)

    def _sum(self, tensors: Mapping[str, Tensor], dims: Mapping[str, int],
             initial_state: Tensor | None, options: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        if self.fused is not None:
            return self._fused_sum(tensors, dims, initial_state, options)
        spec = self.checked.spec
        K = len(self.pieces)
        inits: list[Tensor | None] = [None] * K
        if initial_state is not None:
            inits = list(self._split_state(initial_state, dims, options["cu_seqlens"]))
        ys, states = [], []
        for k in range(K):
            y, s = self._call(k, tensors, initial_state=inits[k], **options)
            ys.append(y.float() if y.dtype in (torch.float16, torch.bfloat16) else y)
            states.append(s)
        y = torch.stack(ys).sum(0) if K > 1 else ys[0]
        if spec.final_state:
            return y, torch.cat([s for s in states if s is not None], dim=2)
        return y, None

    def _fused_sum(self, tensors: Mapping[str, Tensor], dims: Mapping[str, int],
                   initial_state: Tensor | None,
                   options: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """The sum as one op with K·H heads (ssmc.algebra_fuse)."""
        assert self.fused is not None
        K = len(self.checked.pieces)
        init = None
        if initial_state is not None:
            self._split_state(initial_state, dims, options["cu_seqlens"])  # validates
            init = algebra_fuse.state_in(initial_state, K)
        names = [t.name for t in self.fused.spec.tensors]
        sub = {n: tensors[n] for n in names if n in tensors}
        sub[names[-1]] = algebra_fuse.decay_tensor(self.checked, tensors, dims)
        y, state = self.pieces[0](**sub, initial_state=init, **options)
        weights = algebra_fuse.head_weights(self.checked, tensors, dims)
        y = algebra_fuse.output_sum(y, K, weights)
        if self.checked.spec.final_state and state is not None:
            return y, algebra_fuse.state_out(state, K, weights)
        return y, None

    def _split_state(self, state: Tensor, dims: Mapping[str, int],
                     cu_seqlens: Tensor | None) -> tuple[Tensor, ...]:
        c = self.checked
        if not c.spec.initial_state:
            raise TensorError(f"initial_state: spec {c.spec.name} does not declare `initial_state`")
        assert c.state_size is not None
        K = len(c.pieces)
        N = size_of(c.state_size, dims)
        lead = dims[ir.BATCH] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        want = [lead, size_of(c.heads.output, dims), K * N, size_of(c.head_dim, dims)]
        if list(state.shape) != want:
            raise TensorError(f"initial_state: expected shape {want} (batch, H, {K}·N, P: the "
                              f"{K} terms' states stacked along N), got {list(state.shape)}")
        return state.split(N, dim=2)

    def _bidirectional(self, tensors: Mapping[str, Tensor], options: dict[str, Any]) -> Tensor:
        fwd, _ = self._call(0, tensors, **options)
        inputs = {t.name for t in self.checked.spec.tensors if t.kind is ir.TensorKind.INPUT}
        flipped = {n: v.flip(1) if n in inputs else v for n, v in tensors.items()}
        bwd, _ = self._call(1, flipped, **options)
        return fwd + bwd.flip(1) - self._diagonal(tensors)

    def _diagonal(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """(C_i · B_i) X̄_i per head: the diagonal both passes of a quasiseparable mask hold."""
        from ssmc.reference import canonical_roles

        piece = self.pieces[0].checked
        sub = {t.name: tensors[t.name] for t in piece.spec.tensors}
        roles = canonical_roles(piece, sub, bind(piece, sub))
        assert roles.B is not None and roles.C is not None
        H = roles.H

        def heads(t: Tensor) -> Tensor:
            G = t.shape[2]
            return t if G == H else t.repeat_interleave(H // G, dim=2)

        cb = (heads(roles.C) * heads(roles.B)).sum(-1, keepdim=True)
        return cb * heads(roles.x)

    def _decayed_toeplitz(self, tensors: Mapping[str, Tensor], dims: Mapping[str, int],
                          options: dict[str, Any]) -> Tensor:
        spec = self.checked.spec
        mask = spec.mask
        assert isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LearnedKernel)
        assert mask.kernel.log_decay is not None
        taps_decl = self.pieces[0].checked.spec.tensors[-1]
        head, lag = taps_decl.shape
        head_axis = head if isinstance(head, str) else "1.head"
        assert isinstance(lag, str)
        env = {t.name: squeeze_literals(t, tensors[t.name]) for t in spec.tensors}
        K = evaluate(mask.kernel.kernel, env, dims, (head_axis, lag))
        g = evaluate(mask.kernel.log_decay, env, dims, (head_axis, lag))
        lags = torch.arange(dims[lag], device=K.device, dtype=g.dtype if g.dim() else K.dtype)
        taps = (K * torch.exp(lags * g)).expand(1 if isinstance(head, int) else dims[head],
                                                dims[lag])
        dtype = K.dtype if K.is_floating_point() else torch.float32
        sub = dict(tensors) | {taps_decl.name: taps.to(dtype).contiguous()}
        y, _ = self._call(0, sub, **options)
        return y

    def _epilogue(self, y: Tensor, tensors: Mapping[str, Tensor], dims: Mapping[str, int]) -> Tensor:
        from ssmc.reference import _axis, _output_dtype

        c = self.checked
        spec = c.spec
        if spec.skip is not None or spec.gate is not None:
            env = {t.name: squeeze_literals(t, tensors[t.name]) for t in spec.tensors}
            axes = (ir.BATCH, ir.SEQ, _axis(c.heads.output, "head"), _axis(c.head_dim, "P"))
            if spec.skip is not None:
                y = y + evaluate(spec.skip, env, dims, axes)
            if spec.gate is not None:
                y = y * evaluate(spec.gate, env, dims, axes)
        return y.to(_output_dtype(c, tensors))


def _is_qs(mask: ir.MaskExpr) -> bool:
    """A scaled quasiseparable mask, `c · quasiseparable(...)` in normal form."""
    return isinstance(mask, ir.MaskProduct) and any(
        isinstance(f, ir.Quasiseparable) for f in mask.factors)


class ReferencePiece:
    """A piece run by its PyTorch reference (fp64 checks of the composition glue)."""

    def __init__(self, checked: ir.CheckedSpec) -> None:
        self.checked = checked
        self.forms = checked.forms
        self.name = checked.spec.name

    def __call__(self, *, form: ir.Form | str | None = None, chunk_size: int | None = None,
                 **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        from ssmc.reference import reference

        return reference(self.checked, form, chunk_size=chunk_size or 64)(**kwargs)
