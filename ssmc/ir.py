"""The IR: frozen dataclasses that every pass after `lower` shares.

`Spec` is what `lower` builds from the syntax tree (lets inlined, every node with its
source span); `CheckedSpec` is what `check` returns: the spec plus the facts derived
from it (allowed forms, head counts and pattern, state size). Downstream passes take
a `CheckedSpec` and never re-validate.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ssmc.expr import Expr, Span

BATCH = "batch"
SEQ = "seq"

Size = str | int
"""A dimension: a declared dim symbol (bound in the spec or at call time) or a literal."""


class TensorKind(enum.Enum):
    """Per-token inputs carry `[batch, seq, ...]`; parameters carry neither."""

    INPUT = "input"
    PARAM = "param"


class Form(enum.Enum):
    """The forms an SMA can be computed in (DESIGN §1)."""

    RECURRENT = "recurrent"
    QUADRATIC = "quadratic"
    CHUNKED = "chunked"
    CONVOLUTION = "convolution"


class HeadPattern(enum.Enum):
    """Named head patterns of DESIGN §2; GROUPED covers any other valid mix."""

    MHA = "MHA"
    MQA = "MQA"
    MKA = "MKA"
    MVA = "MVA"
    GROUPED = "grouped"


class Hippo(enum.Enum):
    """HiPPO measures with closed-form (A, B) matrices (LSSL)."""

    LEGS = "legs"
    LEGT = "legt"
    LAGT = "lagt"


class Discretization(enum.Enum):
    """How a continuous LTI system becomes the discrete Ā, B̄."""

    ZOH = "zoh"
    BILINEAR = "bilinear"


@dataclass(frozen=True, slots=True, kw_only=True)
class Dim:
    """`dim N = 128` (value bound) or `dim N` (bound at call time)."""

    name: str
    value: int | None
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Tensor:
    """`input x : [batch, seq, H, P]` or `param A : [H]`."""

    name: str
    kind: TensorKind
    shape: tuple[Size, ...]
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Output:
    """`output y : [batch, seq, H, P]`: the output's name and shape; H is the head count."""

    name: str
    shape: tuple[Size, ...]
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Causal:
    """L_ij = 1 for i ≥ j: causal linear attention."""

    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConstDecay:
    """L_ij = γ^(i-j), γ constant per head (RetNet); `log_gamma` has axes ⊆ {head}."""

    log_gamma: Expr
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ScalarSemiseparable:
    """L_ij = exp(cs_i − cs_j), cs = cumsum(log a), log a per (batch, seq, head)."""

    log_a: Expr
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DiagonalSemiseparable:
    """One 1-SS mask per state dim n: log a per (batch, seq, head, N) (Mamba-1, GLA)."""

    log_a: Expr
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LearnedKernel:
    """A Toeplitz kernel given directly: axes {head, L}; L is the window length.

    `log_decay` (a decay times the window, mask algebra): the taps are
    kernel[h, d] · exp(d · log_decay[h]); it has at most a head axis.
    """

    kernel: Expr
    span: Span | None = None
    log_decay: Expr | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LtiKernel:
    """K_k = C Ā^k B̄ from a continuous LTI SSM (S4D, LSSL/HiPPO).

    A: diagonal `[head, N]` or dense `[head, N, N]` (None when `hippo` gives it);
    B: `[head, N]` or `[N]` (None when `hippo` gives it); C: `[head, N]`; dt: `[head]`.
    """

    A: Expr | None
    B: Expr | None
    C: Expr
    dt: Expr
    hippo: Hippo | None
    discretization: Discretization
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Toeplitz:
    """L_ij = k_{i-j} for a learned or LTI-derived kernel; no finite state in general."""

    kernel: LearnedKernel | LtiKernel
    span: Span | None = None


Mask = Causal | ConstDecay | ScalarSemiseparable | DiagonalSemiseparable | Toeplitz
"""The mask kinds every form, kernel and reference handles directly."""


# Mask algebra (docs/variants.md): what `mask A * B`, `mask c * A`, `mask A + B` and
# `mask quasiseparable(...)` lower to. The checker (ssmc.algebra) rewrites products and
# scales into one of the kinds above; sums and bidirectional masks stay composite and
# run as several ops of those kinds (ssmc.algebra_ops).


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskScale:
    """A constant factor c per head (a number or an expression of params): L_ij = c_h."""

    value: Expr
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskProduct:
    """The Hadamard product L = L_1 ∘ L_2 ∘ … of its factors (masks or scales)."""

    factors: tuple[MaskExpr, ...]
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskSum:
    """L = L_1 + L_2 + …: two 1-semiseparable terms give a 2-semiseparable mask.

    After `check` every term is a `Mask` and carries its own state [batch, H, N, P].
    """

    terms: tuple[MaskExpr, ...]
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Quasiseparable:
    """A bidirectional (Hydra) mask: the causal `forward` below and on the diagonal, and
    above it the causal `backward` mask of the reversed sequence:
    L_ij = ∏_{k=j+1..i} a_k (i ≥ j), ∏_{k=i..j-1} b_k (i < j).

    `forward` and `backward` are Causal, ConstDecay or ScalarSemiseparable.
    """

    forward: Mask
    backward: Mask
    span: Span | None = None


Composite = MaskSum | Quasiseparable
"""Masks that run as several ops of the basic kinds (ssmc.algebra_ops)."""
MaskExpr = Mask | MaskScale | MaskProduct | MaskSum | Quasiseparable
"""A mask as written: an algebra of basic masks, before the checker rewrites it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Spec:
    """A lowered `.ssm` file: declarations and role expressions, lets inlined.

    query/key are None exactly for Toeplitz masks (M = L, no C Bᵀ factor).
    """

    name: str
    dims: tuple[Dim, ...]
    tensors: tuple[Tensor, ...]
    output: Output
    mask: MaskExpr
    query: Expr | None
    key: Expr | None
    value: Expr
    skip: Expr | None = None
    gate: Expr | None = None
    initial_state: bool = False
    final_state: bool = False
    varlen: bool = False
    source: str = "<string>"
    span: Span | None = None
    composition: MaskExpr | None = None
    """The mask as written when `check` rewrote it (mask algebra), else None."""

    def tensor(self, name: str) -> Tensor:
        """The declared tensor called `name` (KeyError if none)."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def dim(self, name: str) -> Dim:
        """The declared dim called `name` (KeyError if none)."""
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(name)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadCounts:
    """Head count of each role; each divides `output` (H). `decay` is None for Causal."""

    output: Size
    query: Size | None
    key: Size | None
    value: Size
    decay: Size | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ValueFactors:
    """value = base · scale, base a tensor `[batch, seq, h, P]`, scale free of P (e.g. Δ).

    Lets kernels load x once and scale it in registers instead of materialising X̄.
    """

    base: str
    scale: Expr | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckedSpec:
    """A spec that passed `check`, with the facts every later pass needs."""

    spec: Spec
    forms: tuple[Form, ...]
    heads: HeadCounts
    pattern: HeadPattern
    state_size: Size | None
    """N, the state dimension per head (None for a learned Toeplitz kernel)."""
    head_dim: Size
    """P, the value/output dimension per head."""
    value_factors: ValueFactors | None
    """The value split as base tensor × P-free scale, when it has that shape."""
    derivation: tuple[str, ...] = ()
    """The rewrites `check` applied to the mask as written, one line each (mask algebra)."""
    pieces: tuple[CheckedSpec, ...] = ()
    """For a composite mask (sum, quasiseparable, decayed Toeplitz window): the checked
    spec of each op it runs (no skip or gate; ssmc.algebra_ops), else ()."""
