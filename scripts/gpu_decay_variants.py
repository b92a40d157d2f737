"""How fast can the diagonal decay's cumsum launch be: variants of one stand-alone kernel.

The kernel has the generated `chunked_diag_decay_fwd_kernel`'s shape (one program per chunk,
decay group and n tile; log a = logsigmoid(g) / 16 summed along the chunk, cs stored fp32),
with switches for what each part costs: the expression (none, log1p as ssmc's expression
compiler writes it, plain log(1 + e)), the sum along the chunk (tl.cumsum, a dot with a
triangle of ones in fp32 or tf32x3, none), the tile table's loads, and the launch order.
A copy of g into a buffer of cs's size gives the bandwidth bound. Run on the GPU:

    python scripts/gpu_decay_variants.py --batch 8 --seqlen 2048 --heads 16 --dim 128
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl
import triton.testing


@triton.jit
def decay_variant_kernel(
    cs, g, s_b, s_t, s_h, H, N, NT,
    EXPR: tl.constexpr, SUM: tl.constexpr, ORDER: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    if ORDER == 0:  # the generated kernel's: chunk, head, n tile
        i_r = tl.program_id(0).to(tl.int64)
        i_h = tl.program_id(1).to(tl.int64)
        i_n = tl.program_id(2).to(tl.int64)
    else:  # n tiles of one chunk and head next to each other
        i_n = tl.program_id(0).to(tl.int64)
        i_h = tl.program_id(1).to(tl.int64)
        i_r = tl.program_id(2).to(tl.int64)
    i_b = i_r // NT
    t0 = (i_r % NT) * BLOCK_T
    o_t = tl.arange(0, BLOCK_T)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_c = o_n < N
    b_g = tl.load(g + i_b * s_b + (t0 + o_t[:, None]) * s_t + i_h * s_h + o_n[None, :],
                  mask=m_c[None, :], other=1.0).to(tl.float32)
    if EXPR == 0:
        b_a = b_g
    elif EXPR == 1:  # ssmc's log1p, exact for small e
        t_0 = tl.exp(-tl.abs(b_g))
        t_1 = 1.0 + t_0
        t_2 = t_0 / tl.where(t_1 == 1.0, 1.0, t_1 - 1.0)
        t_3 = tl.where(t_1 == 1.0, t_0, tl.log(t_1) * t_2)
        b_a = (tl.minimum(b_g, 0.0) - t_3) / 16.0
    else:  # plain log(1 + e)
        b_a = (tl.minimum(b_g, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(b_g)))) * 0.0625
    if SUM == 0:
        b_cs = tl.cumsum(b_a, axis=0)
    elif SUM == 1 or SUM == 2:
        tri = tl.where(o_t[:, None] >= o_t[None, :], 1.0, 0.0)
        if SUM == 1:
            b_cs = tl.dot(tri, b_a, input_precision="ieee")
        else:
            b_cs = tl.dot(tri, b_a, input_precision="tf32x3")
    else:
        b_cs = b_a
    p_cs = cs + ((i_r * H + i_h) * BLOCK_T + o_t[:, None]) * N + o_n[None, :]
    tl.store(p_cs, b_cs, mask=m_c[None, :])


def launch(cs, g, *, expr, sum_, order, block_n, warps, chunk=64):
    B, T, H, N = g.shape
    NT = T // chunk
    grid = (B * NT, H, triton.cdiv(N, block_n))
    if order:
        grid = grid[::-1]
    decay_variant_kernel[grid](cs, g, g.stride(0), g.stride(1), g.stride(2), H, N, NT,
                               EXPR=expr, SUM=sum_, ORDER=order, BLOCK_T=chunk,
                               BLOCK_N=block_n, num_warps=warps)


def bench(f) -> float:
    """Median ms of f."""
    return triton.testing.do_bench(f, warmup=10, rep=60, return_mode="median")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    B, T, H, N, Q = args.batch, args.seqlen, args.heads, args.dim, 64
    g = torch.randn(B, T, H, N, device="cuda") * 3
    cs = torch.empty(B * T // Q, H, Q, N, device="cuda")
    want = (torch.nn.functional.logsigmoid(g.double()) / 16).view(B, T // Q, Q, H, N)
    want = want.cumsum(2).permute(0, 1, 3, 2, 4).reshape_as(cs)
    flat = torch.empty_like(cs)
    copy_ms = bench(lambda: flat.view(-1).copy_(g.view(-1)))
    gb = 2 * g.numel() * 4 / 1e9
    print(f"g [{B}, {T}, {H}, {N}] fp32 -> cs fp32: {gb * 1e3:.0f} MB moved")
    print(f"copy (the bound): {copy_ms:.4f} ms, {gb / copy_ms:.2f} TB/s")
    variants = [(e, s, o, n, w) for e in (1, 2, 0) for s in (0, 1, 2, 3) for o in (0, 1)
                for n, w in ((64, 4), (32, 4), (32, 2), (128, 8), (64, 2))]
    print("expr sum order block_n warps      ms   TB/s   max err")
    for e, s, o, n, w in variants:
        if (e, s) != (1, 0) and (n, w) not in ((64, 4), (32, 4)):
            continue  # the tile sweep only for the generated kernel's expression and sum
        try:
            options = {"expr": e, "sum_": s, "order": o, "block_n": n, "warps": w}
            cs.fill_(float("nan"))
            launch(cs, g, **options)
            exact = e != 0 and s != 3  # the variants that compute cs
            err = (cs.double() - want).abs().max().item() if exact else float("nan")
            ms = bench(lambda options=options: launch(cs, g, **options))
            print(f"{e:4d} {s:3d} {o:5d} {n:7d} {w:5d} {ms:8.4f} {gb / ms:6.2f} {err:9.2e}",
                  flush=True)
        except Exception as exc:  # noqa: BLE001 — a variant that cannot compile is reported
            print(f"{e:4d} {s:3d} {o:5d} {n:7d} {w:5d} failed: {type(exc).__name__}: "
                  f"{str(exc)[:120]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
