"""The `ssmc bench` sub-command: its options, and the run → table, JSON, PNG (ssmc.bench)."""

from __future__ import annotations

import argparse
import os
import sys

from ssmc.errors import SsmcError


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    import torch

    if args.device != "cuda" and not torch.cuda.is_available():
        # Kernels on a CPU run under the Triton interpreter, set before anything is compiled.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from ssmc.bench import BenchConfig, failed, run_bench
    from ssmc.bench_peers import PEERS
    from ssmc.bench_report import plot, table

    if args.file.endswith(".json"):
        # A report from an earlier run (e.g. fetched from the GPU machine): table and plot.
        with open(args.file, encoding="utf-8") as f:
            report = json.load(f)
        print(table(report))
        if args.png:
            print(f"wrote {plot(report, args.png)}")
        return 0
    from ssmc.cli import _shape_dims

    config = BenchConfig(
        file=args.file, seqlens=_ints(args.seqlen), batches=_ints(args.batch),
        tokens=args.tokens, dims=_shape_dims(args), dtype=args.dtype, backward=args.backward,
        forms=_words(args.forms), peers=PEERS if args.peers is None else _words(args.peers),
        mamba_src=args.mamba_src,
        device=args.device, rep_ms=args.rep_ms, progress=not args.no_progress)
    report = run_bench(config)
    print(table(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    if args.png:
        print(f"wrote {plot(report, args.png)}")
    problems = failed(report)
    for problem in problems:
        print(f"ssmc bench: FAILED {problem}", file=sys.stderr)
    return 1 if problems else 0


ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _ints(items: list[str] | None) -> tuple[int, ...] | None:
    """`--seqlen 512,1024 --seqlen 2048` → (512, 1024, 2048)."""
    words = _words(items)
    if words is None:
        return None
    try:
        return tuple(int(w) for w in words)
    except ValueError:
        raise SsmcError(f"expected integers separated by commas, got {','.join(words)!r}") from None


def _words(items: list[str] | None) -> tuple[str, ...] | None:
    if items is None:
        return None
    return tuple(w.strip() for item in items for w in item.split(",") if w.strip() not in ("", "none"))


def add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `bench` to the sub-commands of `ssmc`."""
    bench = sub.add_parser(
        "bench", help="time every form and the peers versus T; JSON and a plot",
        description="Time the op of FILE in every form it has (and as the planner picks), "
        "forward and with --backward forward+backward, beside mamba_ssm's Triton SSD, FLA's "
        "chunk kernels and torch's scaled_dot_product_attention where they apply, on the same "
        "random inputs. Each series is checked once per shape against the fp64 reference "
        "(max relative error, against the dtype's bound) before it is timed: plain and "
        "CUDA-graph medians after warm-up, peak extra memory, and the share of the floor "
        "(inputs and outputs moved once at the measured copy bandwidth). Without a GPU it runs "
        "at tiny sizes under the Triton interpreter, peers skipped. Exits 1 if an ssmc series "
        "misses its bound.",
        epilog="examples:\n"
        "  ssmc bench examples/mamba2.ssm --backward --mamba-src mamba_ssm-2.2.4 "
        "--json bench.json --png bench.png\n"
        "  ssmc bench examples/gla.ssm --seqlen 2048 --batch 8 --peers fla --forms chunked\n"
        "  ssmc bench examples/retnet.ssm --seqlen 16 --forms chunked   # CPU, a few seconds\n"
        "  ssmc bench bench.json --png bench.png   # re-plot a report")
    bench.add_argument("file", help="a .ssm spec, or a JSON report of an earlier run to print "
                       "and plot again")
    bench.add_argument("--seqlen", "-T", action="append", metavar="T[,T...]",
                       help="sequence lengths (default 512 … 16384 on a GPU, 16,32 on a CPU)")
    bench.add_argument("--batch", "-b", action="append", metavar="B[,B...]",
                       help="batch size, one for all or one per T (default on a GPU: "
                       "16384 tokens / T; on a CPU: 1)")
    bench.add_argument("--tokens", type=int, help="batch = TOKENS // T for each T")
    bench.add_argument("--dim", action="append", metavar="NAME=INT",
                       help="rebind a dim (on a CPU, dims above 8 shrink to 8 unless given)")
    bench.add_argument("--dtype", default="bfloat16", type=lambda s: ALIASES.get(s, s),
                       choices=["float32", "float16", "bfloat16"],
                       help="dtype of the inputs: bfloat16 (bf16, the default), float16 (fp16) "
                       "or float32 (fp32); float32 on a CPU")
    bench.add_argument("--backward", action="store_true",
                       help="also time (and check the gradients of) forward+backward")
    bench.add_argument("--forms", action="append", metavar="FORM[,FORM...]",
                       help="forms to time, or 'planner' (default: every form, then planner)")
    bench.add_argument("--peers", action="append", metavar="PEER[,PEER...]",
                       help="peers among mamba, fla, sdpa, or 'none' (default: all three)")
    bench.add_argument("--mamba-src", metavar="DIR",
                       help="an unpacked mamba-ssm sdist (its pure-Triton ops are imported "
                       "without the package's CUDA extensions)")
    bench.add_argument("--device", choices=["cuda", "cpu"],
                       help="where to run (default: cuda if present)")
    bench.add_argument("--rep-ms", type=int, default=100,
                       help="milliseconds of calls per GPU timing (default 100)")
    bench.add_argument("--json", metavar="PATH", help="write the report as JSON here")
    bench.add_argument("--png", metavar="PATH",
                       help="plot time versus T per series here (needs ssmc[plot])")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(handler=_cmd_bench)
