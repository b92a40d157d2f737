"""The peers `ssmc bench` times beside ssmc: mamba_ssm's Triton SSD, FLA's chunk kernels, SDPA.

Each peer is an optional import, called with its own argument names and layouts on the
same random inputs as ssmc. A peer gets the spec's canonical core (docs/semantics.md:
x, log a, B, C with their head counts), expanded to every head inside the timed call
where the peer needs that (as its users must), unless a native mapping of the spec's own
tensors fits (mamba_ssm on a Mamba-2 spec: x, dt, A, B, C, dt_bias, D, z with its fused
softplus, skip and gate). Every mapping but SDPA's is checked against ssmc's fp64
reference, of the whole spec (native) or of the core without skip and gate (generic);
SDPA is softmax attention at the same sizes, a timing landmark with no error to report.

mamba_ssm's package `__init__` imports CUDA extensions; `--mamba-src` points at an
unpacked mamba-ssm sdist whose `mamba_ssm/ops/triton` modules are pure Triton, and they
are imported through a stand-in package that skips the `__init__`.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmc import ir
from ssmc.reference import Roles

PEERS = ("mamba", "fla", "sdpa")
MAMBA_CHUNK = 256
"""mamba_ssm's recommended chunk length for `mamba_chunk_scan_combined`."""
MAMBA_NATIVE = ("x", "dt", "A", "B", "C")


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One configuration's tensors: the spec's inputs (bench dtype, device) and its core (fp32)."""

    checked: ir.CheckedSpec
    inputs: dict[str, Tensor]
    roles: Roles


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerCall:
    """A peer called one way: `fn(*args)` → y [batch, T, H, P]; `args` may take gradients."""

    series: str
    fn: Callable[..., Tensor]
    args: tuple[Tensor, ...]
    expected: str | None
    """"spec" (compare with the whole spec's reference), "core" (without skip and gate), or
    None (a different function: no error)."""
    note: str = ""


@dataclass(slots=True)
class Peers:
    """The peers that imported, and why the others did not."""

    found: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def calls(self, case: Case) -> list[list[PeerCall]]:
        """For each peer that applies to `case`: its mappings, the preferred first (none for a
        composite mask: no peer computes a sum of masks or a bidirectional one)."""
        if case.checked.pieces:
            return []
        out = []
        for name, impl in self.found.items():
            candidates = _CALLS[name](impl, case)
            if candidates:
                out.append(candidates)
        return out


def load_peers(wanted: list[str], device: torch.device, mamba_src: str | None) -> Peers:
    """Import the wanted peers; on a CPU none (they are GPU kernels), with a note."""
    peers = Peers()
    unknown = sorted(set(wanted) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown peers {', '.join(unknown)}; known: {', '.join(PEERS)}")
    if wanted and device.type != "cuda":
        peers.notes.append(f"peers skipped on {device.type} ({', '.join(wanted)}): their "
                           "kernels need a GPU")
        return peers
    for name in wanted:
        try:
            peers.found[name], version = _IMPORTS[name](mamba_src)
            peers.versions[name] = version
        except Exception as err:  # an optional peer: note why and go on without it
            peers.notes.append(f"{name} unavailable: {type(err).__name__}: {err}")
    return peers


def import_mamba(source_dir: str | None) -> tuple[Callable[..., Any], str]:
    """mamba_ssm's `mamba_chunk_scan_combined`: from an unpacked sdist, else as installed."""
    if source_dir:
        package = Path(source_dir) / "mamba_ssm"
        if not package.is_dir():
            raise FileNotFoundError(f"no mamba_ssm package in {source_dir}")
        if "mamba_ssm" not in sys.modules:
            stub = types.ModuleType("mamba_ssm")
            stub.__path__ = [str(package)]  # a namespace stand-in: skips __init__'s CUDA imports
            sys.modules["mamba_ssm"] = stub
        version = Path(source_dir).resolve().name.removeprefix("mamba_ssm-") or "source"
    else:
        version = "installed"
    module = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    return module.mamba_chunk_scan_combined, version


def import_fla(_: str | None = None) -> tuple[dict[str, Callable[..., Any]], str]:
    """FLA's chunk_simple_gla, chunk_gla and chunk_linear_attn."""
    import fla
    from fla.ops.gla import chunk_gla
    from fla.ops.linear_attn import chunk_linear_attn
    from fla.ops.simple_gla import chunk_simple_gla

    kernels = {"simple_gla": chunk_simple_gla, "gla": chunk_gla, "linear_attn": chunk_linear_attn}
    return kernels, str(getattr(fla, "__version__", "unknown"))


def import_sdpa(_: str | None = None) -> tuple[Callable[..., Any], str]:
    """torch's scaled_dot_product_attention."""
    return F.scaled_dot_product_attention, torch.__version__


def _heads(t: Tensor, H: int) -> Tensor:
    """[b, T, G, ...] → [b, T, H, ...]: a view when G = 1, else each group repeated H/G times."""
    G = t.shape[2]
    if G == H:
        return t
    if G == 1:
        return t.expand(t.shape[0], t.shape[1], H, *t.shape[3:])
    return t.repeat_interleave(H // G, dim=2)


def _core(case: Case, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """x, log a (fp32), B, C of the core as leaves in the bench dtype."""
    r = case.roles
    assert r.B is not None and r.C is not None
    log_a = None if r.log_a is None else r.log_a.float().contiguous()
    return (r.x.to(dtype).contiguous(), log_a, r.B.to(dtype).contiguous(),
            r.C.to(dtype).contiguous())


def _mamba_calls(mamba: Callable[..., Any], case: Case) -> list[PeerCall]:
    mask, r = case.checked.spec.mask, case.roles
    if not isinstance(mask, ir.ScalarSemiseparable | ir.ConstDecay) or r.B is None or r.C is None:
        return []
    if r.B.shape[2] != r.C.shape[2]:
        return []
    calls = []
    t = case.inputs
    final = case.checked.spec.final_state
    if all(n in t for n in MAMBA_NATIVE) and isinstance(mask, ir.ScalarSemiseparable):
        extras = [n for n in ("dt_bias", "D", "z") if n in t]

        def native(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *rest: Tensor) -> Tensor:
            kw = dict(zip(extras, rest, strict=True))
            out = mamba(x, dt, A, B, C, chunk_size=MAMBA_CHUNK, dt_softplus=True,
                        return_final_states=final, **kw)
            return out[0] if final else out

        args = tuple(t[n] for n in (*MAMBA_NATIVE, *extras))
        calls.append(PeerCall(series="mamba_ssm", fn=native, args=args, expected="spec",
                              note="mamba_chunk_scan_combined on the spec's own tensors "
                              f"({', '.join((*MAMBA_NATIVE, *extras))}), chunk {MAMBA_CHUNK}"))
    x, log_a, B, C = _core(case, case.inputs[case.checked.spec.tensors[0].name].dtype)
    assert log_a is not None
    H = r.H
    # x·Δ with Δ = −log a and A = −1 gives the decay exp(Δ·A) = a and the input x.
    delta = _heads(-log_a, H).contiguous()
    x_m = (_heads(x.float(), H) / delta[..., None]).to(x.dtype).contiguous()
    A = -torch.ones(H, device=x.device, dtype=torch.float32)

    def generic(x_m: Tensor, delta: Tensor, B: Tensor, C: Tensor) -> Tensor:
        out = mamba(x_m, delta, A, B, C, chunk_size=MAMBA_CHUNK, return_final_states=final)
        return out[0] if final else out

    calls.append(PeerCall(series="mamba_ssm", fn=generic, args=(x_m, delta, B, C),
                          expected="core", note="mamba_chunk_scan_combined on the core "
                          f"(Δ = −log a, A = −1, no skip or gate), chunk {MAMBA_CHUNK}"))
    return calls


def _fla_calls(fla: dict[str, Callable[..., Any]], case: Case) -> list[PeerCall]:
    mask, r = case.checked.spec.mask, case.roles
    if isinstance(mask, ir.Toeplitz):
        return []
    dtype = case.inputs[case.checked.spec.tensors[0].name].dtype
    x, log_a, B, C = _core(case, dtype)
    H, final = r.H, case.checked.spec.final_state
    note = "on the core (no skip or gate), B and C expanded to every head inside the call"
    if log_a is None:
        def linear(x: Tensor, B: Tensor, C: Tensor) -> Tensor:
            o, _ = fla["linear_attn"](_heads(C, H), _heads(B, H), _heads(x, H), scale=1.0,
                                      normalize=False, output_final_state=final)
            return o

        return [PeerCall(series="fla chunk_linear_attn", fn=linear, args=(x, B, C),
                         expected="core", note=note)]
    kernel = "gla" if log_a.dim() == 4 else "simple_gla"

    def gated(x: Tensor, log_a: Tensor, B: Tensor, C: Tensor) -> Tensor:
        o, _ = fla[kernel](_heads(C, H), _heads(B, H), _heads(x, H), g=_heads(log_a, H),
                           scale=1.0, output_final_state=final)
        return o

    return [PeerCall(series=f"fla chunk_{kernel}", fn=gated, args=(x, log_a, B, C),
                     expected="core", note=note)]


def _sdpa_calls(sdpa: Callable[..., Any], case: Case) -> list[PeerCall]:
    if isinstance(case.checked.spec.mask, ir.Toeplitz):
        return []
    dtype = case.inputs[case.checked.spec.tensors[0].name].dtype
    x, _, B, C = _core(case, dtype)
    H = case.roles.H

    def attention(x: Tensor, B: Tensor, C: Tensor) -> Tensor:
        q, k, v = (_heads(t, H).transpose(1, 2) for t in (C, B, x))
        return sdpa(q, k, v, is_causal=True).transpose(1, 2)

    return [PeerCall(series="sdpa (softmax, causal)", fn=attention, args=(x, B, C),
                     expected=None, note="softmax attention at the same sizes: time only")]


_IMPORTS: dict[str, Callable[[str | None], tuple[Any, str]]] = {
    "mamba": import_mamba,
    "fla": import_fla,
    "sdpa": import_sdpa,
}
_CALLS: dict[str, Callable[[Any, Case], list[PeerCall]]] = {
    "mamba": _mamba_calls,
    "fla": _fla_calls,
    "sdpa": _sdpa_calls,
}
