"""Drop-in replacements for the peers' kernels, backed by ssmc ops.

`ssmc.compat.mamba`: mamba_ssm's `mamba_chunk_scan_combined` and `selective_state_update`;
`ssmc.compat.fla`: flash-linear-attention's `chunk_simple_gla`, `fused_recurrent_simple_gla`,
`chunk_gla` and `chunk_linear_attn`. Same signatures, shapes and results; switching is an
import swap (docs/switching.md). A call a shim cannot serve raises `CompatError`.
"""

from __future__ import annotations

from ssmc.compat import fla, mamba
from ssmc.compat._specs import CompatError

__all__ = ["CompatError", "fla", "mamba"]
