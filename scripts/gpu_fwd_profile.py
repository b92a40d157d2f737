"""Where the forward spends its GPU time: per-kernel CUDA time of ssmc and of a peer.

Ten forward calls of a spec's op under torch.profiler after a warm-up, kernels sorted by
total CUDA time per call; the peer (FLA `chunk_gla` for a diagonal decay, mamba_ssm's
`mamba_chunk_scan_combined` for a scalar one) on the same core tensors beside it.

    python scripts/gpu_fwd_profile.py examples/gla.ssm --batch 8 --seqlen 2048 \\
        --dim H=16 --dim N=128 --dim P=128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ssmc import ir
from ssmc.bench import fp32_tensors
from ssmc.bench_peers import import_fla, import_mamba
from ssmc.load import load
from ssmc.pipeline import parse_file, with_dims
from ssmc.reference import random_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script below
from gpu_bwd_profile import profile_calls  # noqa: E402


def profile_forward(name: str, run) -> None:
    """Print the kernels of ten forward calls (no autograd), by CUDA time per call."""
    with torch.no_grad():
        profile_calls(f"{name}: {{:.3f}} ms of kernels per forward", run, top=20)


def profile_backward(name: str, op, inputs: dict[str, torch.Tensor], form: str) -> None:
    """Print the kernels of ten forward + backward steps (autograd, a fixed random dy)."""
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point())
              for k, v in inputs.items()}
    y, _ = op(**leaves, form=form)
    dy = torch.randn_like(y)

    def step():
        for leaf in leaves.values():
            leaf.grad = None  # as a training step's zero_grad: no accumulation kernels
        out, _ = op(**leaves, form=form)
        torch.autograd.backward(out, dy)

    profile_calls(f"{name}: {{:.3f}} ms of kernels per forward + backward", step, top=24)


def ncu_forward(name: str, run) -> None:
    """Two warm-up forwards, then one inside cudaProfilerStart/Stop: the range that
    `ncu --profile-from-start off` reads (scripts/gpu_check.sh fwdncu)."""
    with torch.no_grad():
        for _ in range(2):
            run()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        run()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
    print(f"{name}: one forward profiled", flush=True)


def fla_gla(inputs: dict[str, torch.Tensor]):
    """FLA chunk_gla on the GLA example's tensors, its gate log-sigmoid taken outside."""
    kernels, _ = import_fla()
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    g = (F.logsigmoid(inputs["g"].float()) / 16).contiguous()
    return lambda: kernels["gla"](q, k, v, g=g, scale=0.125, output_final_state=False)


class LaunchWith:
    """A stand-in for a module's Triton kernel whose launches take `options` (maxnreg,
    num_warps, constexpr tiles) over the launcher's own."""

    def __init__(self, kernel, **options):
        self.kernel, self.options = kernel, options

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid](*args, **{**kwargs, **self.options})


STAGE_KERNELS = {"state": "chunked_diag_state_fwd_kernel", "intra": "chunked_diag_intra_fwd_kernel",
                 "scan": "chunked_diag_scan_fwd_kernel", "cumsum": "chunked_diag_cumsum_fwd_kernel"}


def staged(mod, stage: str, options: dict, call):
    """call(options) with the stage's kernel launched under `options`' maxnreg, if any."""
    options = dict(options)
    maxnreg = options.pop("maxnreg", None)
    if maxnreg is None:
        return call(options)
    name = STAGE_KERNELS[stage]
    kernel = getattr(mod, name)
    setattr(mod, name, LaunchWith(kernel, maxnreg=maxnreg))
    try:
        return call(options)
    finally:
        setattr(mod, name, kernel)


DIAG_SWEEP = {
    # each stage's defaults and their neighbours (docs/gpu-runs.md, sixteenth session: the
    # defaults were the fastest of these at GLA's shape)
    # (maxnreg: the registers a thread may take, so more programs fit an SM)
    "state": [{}, {"block_n": 32}, {"block_n": 128}, {"num_warps": 8}, {"block_p": 64},
              {"maxnreg": 128}],
    "intra": [{}, {"whole": False}, {"whole_blocks": (32, 8)}, {"whole_blocks": (16, 4)},
              {"whole_blocks": (64, 4)}, {"whole_blocks": (16, 2)}, {"whole_blocks": (32, 2)},
              {"whole_narrow": True}],
    "scan": [{}, {"block_n": 32}, {"block_n": 128}, {"block_n": 32, "num_warps": 8},
             {"num_warps": 8}, {"block_m": 32}, {"block_m": 32, "block_n": 32},
             {"maxnreg": 128}, {"block_m": 32, "maxnreg": 128}],
}


def diag_sweep(op, dims: dict[str, int], batch: int, T: int, dtype: torch.dtype,
               chunk: int, strongest: float = 1 / 8, stages=None) -> None:
    """Median ms of each chunked_diag stage alone per launch option, on core tensors
    [batch, T, H, N or P] (every head its own group), log a drawn from [−strongest, 0]."""
    import triton.testing

    mod = op.module
    H, N, P = dims["H"], dims["N"], dims["P"]
    g = torch.Generator(device="cuda").manual_seed(1)
    x, B, C = (torch.randn(batch, T, H, d, device="cuda", generator=g).to(dtype)
               for d in (P, N, N))
    log_a = -torch.rand(batch, T, H, N, device="cuda", generator=g) * strongest
    tiles, first = mod.seq_tiles(None, batch, T, chunk, x.device)
    prec = "tf32" if dtype != torch.float32 else "ieee"
    cs = mod.chunked_diag_cumsum_fwd(log_a, tiles=tiles, chunk_size=chunk, block_n=64)
    # the forward's own defaults (chunked_diag_fwd): whole-P tiles up to 128, 16-bit A
    tile = {"chunk_size": chunk, "block_n": 64, "block_p": max(16, min(128, P))}
    states, _ = mod.chunked_diag_state_fwd(x, None, B, C, cs=cs, tiles=tiles, first=first,
                                           heads=H, initial_state=None, final_state=None,
                                           dot_precision=prec, **tile)
    A = mod.chunked_diag_intra_fwd(B, C, cs=cs, tiles=tiles, heads=H, chunk_size=chunk,
                                   dot_precision=prec, dtype=x.dtype)
    out = torch.empty_like(x)
    calls = {
        "state": lambda o: mod.chunked_diag_state_fwd(
            x, None, B, C, cs=cs, tiles=tiles, first=first, heads=H, initial_state=None,
            final_state=None, dot_precision=prec, **{**tile, **o}),
        "intra": lambda o: mod.chunked_diag_intra_fwd(
            B, C, cs=cs, tiles=tiles, heads=H, chunk_size=chunk, dot_precision=prec,
            **{"dtype": A.dtype, **o}),
        "scan": lambda o: mod.chunked_diag_scan_fwd(
            x, None, C, cs=cs, states=states, A=A, tiles=tiles, heads=H, out=out,
            dot_precision=prec, **{**tile, **o}),
        "cumsum": lambda o: mod.chunked_diag_cumsum_fwd(
            log_a, tiles=tiles, chunk_size=chunk, **{"block_n": 64, **o}),
    }
    print(f"\n== chunked_diag stages alone (ms, median), chunk {chunk}, log a in "
          f"[-{strongest:g}, 0]", flush=True)
    for stage, options in (*DIAG_SWEEP.items(), ("cumsum", [{}, {"block_n": 32}])):
        if stages and stage not in stages:
            continue
        for o in options:
            try:
                ms = triton.testing.do_bench(lambda s=stage, o=o: staged(mod, s, o, calls[s]),
                                             warmup=5, rep=40, return_mode="median")
                print(f"  {stage:7s} {ms:8.3f} ms  {o or 'defaults'}", flush=True)
            except Exception as exc:  # noqa: BLE001 — an option that cannot launch is reported
                print(f"  {stage:7s} failed  {o}: {type(exc).__name__}: {str(exc)[:100]}")


def decay_sweep(op, inputs: dict[str, torch.Tensor], chunk: int) -> None:
    """Median ms of the decay's cumsum launch alone (DecayInputs.cumsum: the spec's decay
    expression summed per chunk) per n tile and warps, on the op's own inputs."""
    import triton.testing

    mod = op.module
    if not hasattr(mod, "DecayInputs"):
        return
    tensors = tuple(inputs[name] for name in op._names)
    sizes = mod._ssmc_setup(tensors, None, None, "chunked", chunk)[0]
    decay = mod.DecayInputs(tensors, sizes)
    tiles, _ = mod.seq_tiles(None, sizes["batch"], sizes["seq"], chunk, tensors[0].device)
    print(f"\n== the decay's cumsum alone (ms, median), chunk {chunk}", flush=True)
    for block_n in (16, 32, 64, 128):
        for warps in (None, 1, 2, 4, 8):
            ms = triton.testing.do_bench(
                lambda n=block_n, w=warps: decay.cumsum(tiles=tiles, chunk_size=chunk,
                                                        block_n=n, num_warps=w),
                warmup=5, rep=40, return_mode="median")
            print(f"  block_n {block_n:3d} warps {warps or 'default'}: {ms:.3f} ms", flush=True)


def settings_ab(op, checked, drawn: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                form: str, settings: list[dict]) -> None:
    """Kernels and ‖y − y_fp64‖ / ‖y_fp64‖ of the forward with each of `settings` (module
    attributes set for its run, restored after)."""
    from ssmc.reference import reference

    mod = op.module
    want, _ = reference(checked)(**{k: v.double().cuda() for k, v in drawn.items()})
    for setting in settings:
        saved = {name: getattr(mod, name) for name in setting}
        for name, value in setting.items():
            setattr(mod, name, value)
        try:
            with torch.no_grad():
                y, _ = op(**inputs, form=form)
            err = ((y.double() - want).norm() / want.norm()).item()
            label = ", ".join(f"{name} {getattr(value, 'label', value)}"
                              for name, value in setting.items())
            profile_forward(f"ssmc {form}, {label} (y err {err:.2e})",
                            lambda: op(**inputs, form=form))
        finally:
            for name, value in saved.items():
                setattr(mod, name, value)


def narrow_settings(mod) -> list[dict]:
    """The intra's earlier-keys dot in fp32 and in C's 16-bit type (intra_narrow)."""
    default = mod.intra_narrow

    def narrow(on: bool):
        def rule(C):  # intra_narrow, off or as the module has it
            return on and default(C)

        rule.label = on
        return rule

    return [{"intra_narrow": narrow(False)}, {"intra_narrow": narrow(True)}]


# the intra by sub-chunks and by whole chunks, the whole chunk's dot in 16 bits and in tf32
WHOLE_SETTINGS = [{"WHOLE_INTRA": False}, {"WHOLE_INTRA": True, "WHOLE_NARROW": True},
                  {"WHOLE_INTRA": True, "WHOLE_NARROW": False}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mamba-src", default=None)
    parser.add_argument("--form", default="chunked", help="the ssmc form profiled (chunked)")
    parser.add_argument("--diag-sweep", action="store_true",
                        help="also time each chunked_diag stage alone per launch option")
    parser.add_argument("--unfused", action="store_true",
                        help="also profile the diagonal forward with FUSE_DECAY_INTRA on and off")
    parser.add_argument("--decay-sweep", action="store_true",
                        help="also time the decay expression's cumsum launch alone per n tile "
                             "and warps")
    parser.add_argument("--narrow-ab", action="store_true",
                        help="also profile and check y against fp64 with the intra's "
                             "earlier-keys dot in fp32 and in 16 bits (intra_narrow)")
    parser.add_argument("--backward", action="store_true",
                        help="also profile forward + backward steps of ssmc (autograd)")
    parser.add_argument("--whole-ab", action="store_true",
                        help="also profile and check y against fp64 with the intra by "
                             "sub-chunks and by whole chunks (WHOLE_INTRA, WHOLE_NARROW)")
    parser.add_argument("--ncu", action="store_true",
                        help="one profiled forward of ssmc and of the peer, for ncu (no timing)")
    parser.add_argument("--sweep-chunks", type=int, nargs="+", default=[64, 128],
                        help="the chunk lengths --diag-sweep times (64 128)")
    args = parser.parse_args()
    dims = {k: int(v) for k, v in (d.split("=", 1) for d in args.dim)}
    checked = with_dims(parse_file(args.spec), dims)
    dtype = getattr(torch, args.dtype)
    drawn = random_inputs(checked, batch=args.batch, seqlen=args.seqlen,
                          generator=torch.Generator().manual_seed(0))
    drawn.pop("initial_state", None)
    wide = fp32_tensors(checked)  # params and what the decay reads stay fp32, as in ssmc bench
    inputs = {k: v.to("cuda", torch.float32 if k in wide else dtype) for k, v in drawn.items()}
    op = load(checked)
    print(f"{args.spec} batch {args.batch} seqlen {args.seqlen} dims {dims} {args.dtype}")
    mask = checked.spec.mask
    if args.ncu:
        ncu_forward(f"ssmc {args.form}", lambda: op(**inputs, form=args.form))
        if isinstance(mask, ir.DiagonalSemiseparable) and {"q", "k", "v", "g"} <= inputs.keys():
            ncu_forward("fla chunk_gla", fla_gla(inputs))
        return 0
    profile_forward(f"ssmc {args.form}", lambda: op(**inputs, form=args.form))
    if args.unfused and hasattr(op.module, "FUSE_DECAY_INTRA"):
        default = op.module.FUSE_DECAY_INTRA
        for fuse in (True, False):
            op.module.FUSE_DECAY_INTRA = fuse
            profile_forward(f"ssmc {args.form}, FUSE_DECAY_INTRA = {fuse}",
                            lambda: op(**inputs, form=args.form))
        op.module.FUSE_DECAY_INTRA = default
    if args.narrow_ab and hasattr(op.module, "intra_narrow"):
        settings_ab(op, checked, drawn, inputs, args.form, narrow_settings(op.module))
    if args.backward:
        profile_backward(f"ssmc {args.form}", op, inputs, args.form)
    if args.whole_ab and hasattr(op.module, "WHOLE_INTRA"):
        settings_ab(op, checked, drawn, inputs, args.form, WHOLE_SETTINGS)
    if args.diag_sweep:
        for chunk in args.sweep_chunks:
            diag_sweep(op, dims, args.batch, args.seqlen, dtype, chunk)
            for strongest in (1.0, 4.0):  # the whole-chunk intra's spread: mid, past it
                diag_sweep(op, dims, args.batch, args.seqlen, dtype, chunk, strongest,
                           stages={"intra"})
    if args.decay_sweep:
        for chunk in args.sweep_chunks:
            decay_sweep(op, inputs, chunk)
    try:
        if isinstance(mask, ir.DiagonalSemiseparable) and {"q", "k", "v", "g"} <= inputs.keys():
            profile_forward("fla chunk_gla", fla_gla(inputs))
        elif isinstance(mask, ir.ScalarSemiseparable) and args.mamba_src:
            mamba, _ = import_mamba(args.mamba_src)
            t = inputs
            profile_forward("mamba_ssm", lambda: mamba(
                t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=256, D=t.get("D"),
                z=t.get("z"), dt_bias=t.get("dt_bias"), dt_softplus=True))
    except ImportError as exc:
        print(f"peer not available: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
