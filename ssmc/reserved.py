"""The one list of names a tensor may not take, because the generated op or module uses them.

A tensor becomes a keyword argument of `SsmcOp.__call__` and of the generated `forward`
(and an argument of the op schemas), beside their own arguments; `check` refuses these
names with a located error, so that render and load never meet them. Tests pin that
`ssmc/render.py` and `ssmc/ops.py` reserve nothing beyond this list.
"""

from __future__ import annotations

CALL_KEYWORDS = ("initial_state", "cu_seqlens", "form", "chunk_size")
"""Keyword arguments of every op call and of `forward`."""
GRADIENT_KEYWORDS = ("grad_y", "grad_final_state")
"""Arguments of the backward op and of the generated backward."""
MODULE_KEYWORDS = ("launch", "launch_bwd")
"""Further keyword arguments of the generated `forward` and `backward` (launch options:
tiles, warps; the backward's for its fused launcher)."""
KEPT_KEYWORDS = ("keep_core", "kept_core")
"""The forward op's option to keep y before the output roles, and the generated backward's
argument that takes it (ssmc.ops)."""
RESERVED_TENSOR_NAMES = frozenset(
    {*CALL_KEYWORDS, *GRADIENT_KEYWORDS, *MODULE_KEYWORDS, *KEPT_KEYWORDS}
)
"""(`self` is free: the op's own is positional-only.)"""
RESERVED_PREFIX = "_ssmc"
"""Prefix of the generated module's private names."""


def is_reserved_tensor_name(name: str) -> bool:
    """Whether `name` cannot name an input or param (see the module docstring)."""
    return name in RESERVED_TENSOR_NAMES or name.startswith(RESERVED_PREFIX)
