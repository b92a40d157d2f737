"""Human-readable views of a checked spec: the one-screen summary and the IR dump."""

from __future__ import annotations

from ssmc import ir
from ssmc.expr import show

MASK_WORDS = {
    ir.Causal: "causal (linear attention): L_ij = 1",
    ir.ConstDecay: "constant decay per head (RetNet): L_ij = γ^(i-j)",
    ir.ScalarSemiseparable: "1-semiseparable, scalar decay (Mamba-2 / SSD): L_ij = ∏ a_k",
    ir.DiagonalSemiseparable: "diagonal, one decay per state dim (Mamba-1 / GLA): L_ij,n = ∏ a_k,n",
    ir.Toeplitz: "Toeplitz: L_ij = K[i-j]",
}


def size_text(size: ir.Size | None, spec: ir.Spec) -> str:
    """`H=80` for a bound dim, `H` for one bound at call time, `1` for a literal."""
    if size is None:
        return "-"
    if isinstance(size, int):
        return str(size)
    value = spec.dim(size).value if size in {d.name for d in spec.dims} else None
    return f"{size}={value}" if value is not None else size


def shape_text(shape: tuple[ir.Size, ...], spec: ir.Spec) -> str:
    """`[batch, seq, H=80, P=64]`."""
    return "[" + ", ".join(size_text(a, spec) for a in shape) + "]"


def mask_text(mask: ir.MaskExpr) -> str:
    """The mask's structure and its defining expression."""
    if type(mask) not in MASK_WORDS or _decayed(mask):  # mask algebra
        from ssmc.algebra import mask_text as algebra_text

        return _ALGEBRA_WORDS.get(type(mask), "composite") + ": " + algebra_text(mask)
    words = MASK_WORDS[type(mask)]
    match mask:
        case ir.ConstDecay(log_gamma=e):
            return f"{words}; log γ = {show(e)}"
        case ir.ScalarSemiseparable(log_a=e) | ir.DiagonalSemiseparable(log_a=e):
            return f"{words}; log a = {show(e)}"
        case ir.Toeplitz(kernel=ir.LearnedKernel(kernel=e)):
            return f"{words}, learned kernel K = {show(e)}"
        case ir.Toeplitz(kernel=ir.LtiKernel() as k):
            a = f"hippo {k.hippo.value}" if k.hippo else f"A = {show(k.A)}, B = {show(k.B)}" \
                if k.A is not None and k.B is not None else "A, B"
            return (f"{words}, LTI kernel K_k = C Ā^k B̄ ({a}, C = {show(k.C)}, "
                    f"dt = {show(k.dt)}, {k.discretization.value})")
    return words


_ALGEBRA_WORDS = {
    ir.MaskSum: "sum of masks, one state recurrence per term (2-semiseparable for two 1-SS)",
    ir.Quasiseparable: "bidirectional (quasiseparable, Hydra): forward + backward pass",
    ir.MaskProduct: "scaled",
    ir.Toeplitz: "Toeplitz window times a decay",
}


def _decayed(mask: ir.MaskExpr) -> bool:
    return isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LearnedKernel) \
        and mask.kernel.log_decay is not None


def derivation_lines(checked: ir.CheckedSpec, indent: str) -> list[str]:
    """How the mask as written became the mask that runs (mask algebra), one line each."""
    spec = checked.spec
    if spec.composition is None:
        return []
    from ssmc.algebra import mask_text as algebra_text

    lines = [f"{indent}written  {algebra_text(spec.composition)}"]
    lines += [f"{indent}rewrite  {step}" for step in checked.derivation]
    for piece in checked.pieces:
        forms = ", ".join(f.value for f in piece.forms)
        lines.append(f"{indent}piece    {piece.spec.name}: {algebra_text(piece.spec.mask)}, "
                     f"value {show(piece.spec.value)} ({forms})")
    if any(" → one op `" in step for step in checked.derivation):  # ssmc.algebra_fuse
        lines.append(f"{indent}plan     the sum runs as the one op above, planned as one spec; "
                     f"a cost table is that of one piece (the op has {len(checked.pieces)}× "
                     f"its heads)")
    elif checked.pieces:
        lines.append(f"{indent}plan     each piece is planned on its own (one op each); a cost "
                     f"table is that of one piece, the call costs about {len(checked.pieces)}×")
    return lines


def summary(checked: ir.CheckedSpec) -> str:
    """The one-screen summary `ssmc check` prints."""
    spec = checked.spec
    h = checked.heads
    lines = [f"{spec.name} ({spec.source})"]
    lines.append(f"  mask     {mask_text(spec.mask)}")
    lines += derivation_lines(checked, "  ")
    heads = [f"output {size_text(h.output, spec)}"]
    for label, count in (("query C", h.query), ("key B", h.key), ("value X", h.value),
                         ("decay", h.decay)):
        if count is not None:
            heads.append(f"{label} {size_text(count, spec)}")
    lines.append(f"  heads    {checked.pattern.value}: " + ", ".join(heads))
    for role in ("query", "key", "value", "skip", "gate"):
        value = getattr(spec, role)
        if value is not None:
            lines.append(f"  {role:<8} {show(value)}")
    for tensor in spec.tensors:
        lines.append(f"  {tensor.kind.value:<8} {tensor.name} {shape_text(tensor.shape, spec)}")
    lines.append(f"  output   {spec.output.name} {shape_text(spec.output.shape, spec)}")
    lines.append("  forms    " + ", ".join(f.value for f in checked.forms))
    if isinstance(spec.mask, ir.Quasiseparable):
        lines.append("  state    none carried: a bidirectional mask reads the whole sequence")
    elif isinstance(spec.mask, ir.MaskSum) and checked.state_size is not None:
        shape = ("batch", h.output, f"{len(checked.pieces)}·{size_text(checked.state_size, spec)}",
                 checked.head_dim)
        lines.append(f"  state    {shape_text(shape, spec)} fp32 per sequence (the terms' "
                     "states stacked along N)")
    elif isinstance(spec.mask, ir.Toeplitz):
        lines.append("  state    none carried: Toeplitz forms (quadratic, convolution) keep no state")
    else:
        shape: tuple[ir.Size, ...] = ("batch", h.output, checked.state_size or 1,
                                      checked.head_dim)
        lines.append(f"  state    {shape_text(shape, spec)} fp32 per sequence")
    options = [flag for flag in ("initial_state", "final_state", "varlen") if getattr(spec, flag)]
    lines.append("  options  " + (", ".join(options) if options else "none"))
    return "\n".join(lines)


def dump(checked: ir.CheckedSpec) -> str:
    """The IR pretty-printed (`ssmc explain`): every node, expressions in infix."""
    spec = checked.spec
    lines = [f"Spec {spec.name}"]
    for d in spec.dims:
        lines.append(f"  Dim {d.name} = {d.value if d.value is not None else '(call time)'}")
    for t in spec.tensors:
        lines.append(f"  Tensor {t.name}: {t.kind.value} {shape_text(t.shape, spec)}")
    lines.append(f"  Output {spec.output.name}: {shape_text(spec.output.shape, spec)}")
    lines.append(f"  Mask {type(spec.mask).__name__}: {mask_text(spec.mask)}")
    lines += derivation_lines(checked, "    ")
    for role in ("query", "key", "value", "skip", "gate"):
        value = getattr(spec, role)
        if value is not None:
            lines.append(f"  {role.capitalize()} {show(value)}")
    vf = checked.value_factors
    if vf is not None:
        scale = show(vf.scale) if vf.scale is not None else "1"
        lines.append(f"  ValueFactors base={vf.base} scale={scale}")
    lines.append(f"  HeadPattern {checked.pattern.value}  state N={checked.state_size} "
                 f"P={checked.head_dim}")
    lines.append("  Forms " + ", ".join(f.value for f in checked.forms))
    return "\n".join(lines)
