"""Sequence-mixing layers built from a spec: `SequenceMixer` (any spec) and `Mamba2Block`.

`SequenceMixer(spec, d_model)` is the layer a researcher drops into a model: one fused
Linear projects u [batch, T, d_model] to every per-token `input` of the spec, a short causal
depthwise conv + SiLU runs on the inputs the query/key/value read (Mamba's conv on x, B, C),
the op mixes along T, a per-group RMSNorm and a Linear take y [batch, T, H, P] back to
d_model. Every `param` is created and initialised from the role it plays (below);
`step` decodes one token from carried (conv, SSM) state. `Mamba2Block` is the layer of
Mamba-2 (Dao & Gu 2024) with its usual constructor, on the SSD spec of examples/mamba2.ssm.

Parameter initialisation by role: `ssmc.nn_init`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmc import ir
from ssmc.algebra_pieces import mask_exprs
from ssmc.bind import size_of
from ssmc.expr import refs
from ssmc.load import as_checked, load
from ssmc.nn_init import ParamInit, param_inits
from ssmc.pipeline import with_dims
from ssmc.reference import decay_inputs, reference

MAMBA2_SPEC = """\
# Mamba-2 (SSD), as examples/mamba2.ssm; Mamba2Block rebinds the dims.
ssm mamba2

dim H = 80, G = 1, N = 128, P = 64

input x  : [batch, seq, H, P]
input dt : [batch, seq, H]
input B  : [batch, seq, G, N]
input C  : [batch, seq, G, N]
input z  : [batch, seq, H, P]
param A       : [H]
param dt_bias : [H]
param D       : [H]
output y : [batch, seq, H, P]

let delta = clamp(softplus(dt + dt_bias), 0.0, inf)

mask semiseparable(log_a = delta * A)
query C
key   B
value x * delta
skip  D * x
gate  silu(z)

initial_state
final_state
varlen
"""

# ---------------------------------------------------------------- dims


def bind_dims(
    spec: ir.CheckedSpec | str | os.PathLike[str],
    d_model: int,
    *,
    expand: int = 2,
    headdim: int = 64,
    dims: Mapping[str, int] | None = None,
) -> ir.CheckedSpec:
    """The spec with every dim bound: `dims` first (they may rebind the spec's own values),
    then an open output head count H / head dim P from H·P = expand·d_model (P = headdim
    when both are open). ValueError names any dim still open."""
    checked = as_checked(spec)
    values = {d.name: d.value for d in checked.spec.dims} | dict(dims or {})
    H, P = checked.heads.output, checked.head_dim
    d_inner = expand * d_model
    h_open = isinstance(H, str) and values.get(H) is None
    if isinstance(P, str) and values.get(P) is None:
        values[P] = headdim if h_open else d_inner // size_of(H, values)  # type: ignore[arg-type]
    if h_open:
        values[H] = max(1, d_inner // size_of(P, values))  # type: ignore[arg-type,index]
    missing = sorted(n for n, v in values.items() if v is None)
    if missing:
        raise ValueError(
            f"{checked.spec.name}: bind the dims {', '.join(missing)} with dims={{...}}"
        )
    return with_dims(checked, {k: v for k, v in values.items() if v is not None})


# ---------------------------------------------------------------- layers


class RMSNormGroups(nn.Module):
    """RMSNorm over groups of the last axis (Mamba-2's grouped norm), computed in fp32."""

    def __init__(self, dim: int, groups: int = 1, eps: float = 1e-5, **factory: Any) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, y: Tensor) -> Tensor:
        dtype = torch.promote_types(y.dtype, torch.float32)
        g = y.to(dtype).unflatten(-1, (self.groups, -1))
        g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * self.weight.to(dtype)).to(y.dtype)


class SequenceMixer(nn.Module):
    """u [batch, T, d_model] → [batch, T, d_model] through the op of `spec`.

    spec: path, text or CheckedSpec; dims/expand/headdim bind its dims (`bind_dims`);
    d_conv: kernel of the short causal conv on the query/key/value inputs (0: none);
    norm_groups: groups of the RMSNorm on y (default: one per head; 0: no norm);
    form/chunk_size: passed to the op; use_reference: run `ssmc.reference` (any dtype,
    fp64 included) instead of the compiled op;
    skip_init: initial value of the skip/gate params (Mamba's D; 1 as in Mamba);
    gate_bias: when set, a learned bias (initialised to it) on the projected inputs only the
    gate reads (Mamba-2's z), so silu(z) starts open and nearly uniform across tokens
    (MQAR learns recall much sooner with skip_init=0, gate_bias=3: examples/mqar.py).
    """

    def __init__(
        self,
        spec: ir.CheckedSpec | str | os.PathLike[str],
        d_model: int,
        *,
        expand: int = 2,
        headdim: int = 64,
        dims: Mapping[str, int] | None = None,
        d_conv: int = 4,
        norm_groups: int | None = None,
        bias: bool = False,
        form: str | None = None,
        chunk_size: int | None = None,
        use_reference: bool = False,
        skip_init: float = 1.0,
        gate_bias: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.checked = bind_dims(spec, d_model, expand=expand, headdim=headdim, dims=dims)
        s = self.checked.spec
        # What the decay reads stays fp32 under autocast, as Mamba-2 runs dt (bf16 decays
        # lose the state's precision over long spans).
        self.decay_inputs = decay_inputs(s)
        self.sizes = {d.name: int(d.value) for d in s.dims if d.value is not None}
        self.d_model, self.form, self.chunk_size = d_model, form, chunk_size
        self.H = size_of(self.checked.heads.output, self.sizes)
        self.P = size_of(self.checked.head_dim, self.sizes)
        self.N = size_of(self.checked.state_size, self.sizes) if self.checked.state_size else 0
        if isinstance(s.mask, ir.MaskSum):  # the terms' states stacked along N
            self.N *= len(self.checked.pieces)
        self.use_reference = use_reference
        self.op = None if use_reference else load(self.checked)
        inputs = [t for t in s.tensors if t.kind is ir.TensorKind.INPUT]
        self.input_shapes = {
            t.name: tuple(size_of(x, self.sizes) for x in t.shape[2:]) for t in inputs
        }
        mixed = set().union(*(refs(e) for e in (s.query, s.key, s.value) if e is not None))
        mask_reads = set().union(*(refs(e) for e in mask_exprs(s.mask)))
        self.conv_names = [t.name for t in inputs if t.name in mixed - mask_reads] if d_conv else []
        widths = [math.prod(self.input_shapes[t.name]) for t in inputs]
        self.in_proj = nn.Linear(d_model, sum(widths), bias=bias, **factory)
        self.widths = dict(zip(self.input_shapes, widths, strict=True))
        conv_dim = sum(self.widths[n] for n in self.conv_names)
        self.d_conv = d_conv if conv_dim else 0
        if self.d_conv:
            self.conv1d = nn.Conv1d(
                conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, **factory
            )
        gated = refs(s.gate) - mixed - mask_reads if s.gate is not None else set()
        self.gate_names = (
            [t.name for t in inputs if t.name in gated] if gate_bias is not None else []
        )
        if self.gate_names:
            width = sum(self.widths[n] for n in self.gate_names)
            self.gate_bias = nn.Parameter(torch.full((width,), float(gate_bias), **factory))
        self.inits = param_inits(self.checked, skip_init=skip_init)
        self.params = nn.ParameterDict(
            {n: nn.Parameter(i.raw().to(**factory)) for n, i in self.inits.items()}
        )
        groups = self.H if norm_groups is None else norm_groups
        self.norm = RMSNormGroups(self.H * self.P, groups, **factory) if groups else None
        self.out_proj = nn.Linear(self.H * self.P, d_model, bias=bias, **factory)

    def spec_params(self) -> dict[str, Tensor]:
        """The values the op receives for the spec's params (A from A_log, ...)."""
        return {n: self.inits[n].apply(p) for n, p in self.params.items()}

    def _tensors(self, u: Tensor, conv: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """Per-token inputs of the spec from u [batch, T, d_model] (conv'd where it applies)."""
        parts = dict(
            zip(self.widths, self.in_proj(u).split(list(self.widths.values()), -1), strict=True)
        )
        if self.gate_names:
            biases = self.gate_bias.split([self.widths[n] for n in self.gate_names])
            parts.update({n: parts[n] + b for n, b in zip(self.gate_names, biases, strict=True)})
        if self.conv_names:
            xs = torch.cat([parts[n] for n in self.conv_names], -1)
            xs = F.silu(conv(xs)).split([self.widths[n] for n in self.conv_names], -1)
            parts.update(zip(self.conv_names, xs, strict=True))
        parts = {n: v.float() if n in self.decay_inputs else v for n, v in parts.items()}
        return {
            n: v.unflatten(-1, self.input_shapes[n]) if self.input_shapes[n] else v[..., 0]
            for n, v in parts.items()
        }

    def _run(
        self,
        tensors: dict[str, Any],
        *,
        form: str | None = None,
        chunk_size: int | None = None,
        **options: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """The op (or the reference) on the spec's tensors; options: initial_state, cu_seqlens."""
        if self.op is not None:
            return self.op(**tensors, **options, form=form, chunk_size=chunk_size)
        run = reference(self.checked, form, chunk_size=chunk_size or 64)
        return run(**tensors, **options)

    def _out(self, y: Tensor) -> Tensor:
        y = y.flatten(-2)
        return self.out_proj(self.norm(y) if self.norm is not None else y)

    def forward(
        self,
        u: Tensor,
        *,
        initial_state: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        form: str | None = None,
        chunk_size: int | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """[batch, T, d_model] → [batch, T, d_model] (and the final SSM state if asked)."""
        T = u.shape[1]

        def conv(xs: Tensor) -> Tensor:
            if cu_seqlens is None:
                # Back to [batch, T, channels] in memory: the op reads each input's last axis.
                return self.conv1d(xs.transpose(1, 2))[..., :T].transpose(1, 2).contiguous()
            # Packed sequences: the conv restarts at each boundary like the state does.
            bounds = cu_seqlens.tolist()
            return torch.cat(
                [conv_one(xs[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], 1
            )

        def conv_one(xs: Tensor) -> Tensor:
            return self.conv1d(xs.transpose(1, 2))[..., : xs.shape[1]].transpose(1, 2).contiguous()

        tensors = self._tensors(u, conv) | self.spec_params()
        options = {"initial_state": initial_state, "cu_seqlens": cu_seqlens}
        y, state = self._run(
            tensors,
            form=form or self.form,
            chunk_size=chunk_size or self.chunk_size,
            **{k: v for k, v in options.items() if v is not None},
        )
        out = self._out(y)
        return (out, state) if return_state else out

    def allocate_inference_state(
        self,
        batch: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Zero (conv_state [batch, conv channels, d_conv], ssm_state [batch, H, N, P]; a sum
        of K masks: [batch, H, K·N, P], its terms' states stacked along N)."""
        weight = self.in_proj.weight
        device = device or weight.device
        dtype = dtype or weight.dtype
        channels = sum(self.widths[n] for n in self.conv_names)
        conv_state = torch.zeros(batch, channels, self.d_conv, device=device, dtype=dtype)
        # The op's state is fp32; only the reference takes (and keeps) fp64.
        sdtype = torch.float64 if self.use_reference and dtype == torch.float64 else torch.float32
        ssm_state = torch.zeros(batch, self.H, self.N, self.P, device=device, dtype=sdtype)
        return conv_state, ssm_state

    def step(
        self, hidden: Tensor, conv_state: Tensor, ssm_state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One token: hidden [batch, d_model] → (out [batch, d_model], conv_state, ssm_state).

        Runs the op on T = 1 from the carried state (the decode kernel on CUDA); the states
        returned are new tensors, the ones given are not modified.
        """
        s = self.checked.spec
        if not (s.initial_state and s.final_state):
            raise ValueError(f"{s.name}: step needs a spec with initial_state and final_state")
        new_conv = conv_state

        def conv(xs: Tensor) -> Tensor:
            nonlocal new_conv
            new_conv = torch.cat([conv_state[..., 1:], xs[:, 0, :, None].to(conv_state.dtype)], -1)
            w, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias
            assert bias is not None
            out = (new_conv * w).sum(-1) + bias
            return out[:, None].to(xs.dtype)

        tensors = self._tensors(hidden[:, None], conv) | self.spec_params()
        y, state = self._run(tensors, initial_state=ssm_state)
        assert state is not None
        return self._out(y)[:, 0], new_conv, state


class Mamba2Block(SequenceMixer):
    """The Mamba-2 mixer: in-projection → causal depthwise conv (x, B, C) → SiLU → SSD →
    gated RMSNorm norm(y·silu(z)) over ngroups groups → out-projection.

    H = expand·d_model / headdim heads of P = headdim, state N = d_state, G = ngroups; the
    spec is examples/mamba2.ssm (`MAMBA2_SPEC`), or any spec with its tensors (x, dt, B, C,
    z, A, dt_bias, D) and flags.
    """

    TENSORS = ("x", "dt", "B", "C", "z", "A", "dt_bias", "D")

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 64,
        headdim: int = 64,
        ngroups: int = 1,
        expand: int = 2,
        d_conv: int = 4,
        chunk_size: int | None = None,
        spec: ir.CheckedSpec | str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        checked = as_checked(spec if spec is not None else MAMBA2_SPEC)
        names = {t.name for t in checked.spec.tensors}
        if names != set(self.TENSORS):
            raise ValueError(
                f"Mamba2Block needs a spec with tensors {self.TENSORS}, got {sorted(names)}"
            )
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"expand·d_model = {d_inner} is not a multiple of headdim {headdim}")
        wanted = {"H": d_inner // headdim, "P": headdim, "N": d_state, "G": ngroups}
        declared = {d.name for d in checked.spec.dims}
        dims = {k: v for k, v in wanted.items() if k in declared}
        super().__init__(
            checked,
            d_model,
            dims=dims,
            d_conv=d_conv,
            norm_groups=ngroups,
            chunk_size=chunk_size,
            **kwargs,
        )


__all__ = ["MAMBA2_SPEC", "Mamba2Block", "ParamInit", "SequenceMixer", "bind_dims", "param_inits"]
