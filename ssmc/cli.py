"""The `ssmc` command: check, explain, run and compile `.ssm` specs.

Spec and tensor errors print as `file:line:col: error: ...` and exit 2; anything else
is reported as an internal error (a bug in ssmc) and exits 3, never as a bare traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ssmc.bench_cli import add_bench
from ssmc.errors import SsmcError
from ssmc.log import configure as configure_logging

if TYPE_CHECKING:
    from ssmc.symbolic import Proof

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


def _cmd_check(args: argparse.Namespace) -> int:
    from ssmc.pipeline import parse_file
    from ssmc.summary import summary

    checked = parse_file(args.file)
    print(summary(checked))
    if args.no_proof:
        print("  proof    skipped (--no-proof)")
        return 0
    from ssmc.symbolic import prove

    proof = prove(checked, T=args.proof_T)
    print(f"  proof    {_proof_text(proof)}, {proof.seconds:.2f} s")
    return 0


def _proof_text(proof: Proof) -> str:
    """`recurrent = quadratic = chunked(Q=2) = chunked(Q=3) = M` and what was compared."""
    forms: list[str] = []
    for check in proof.checks:
        name = check.form.value + (f"(Q={check.chunk_size})" if check.chunk_size else "")
        if name not in forms:
            forms.append(name)
    quantities = sorted({c.quantity for c in proof.checks})
    s = proof.sizes
    return (" = ".join([*forms, "M"]) + f" for {', '.join(quantities)} "
            f"(T={s.T}, N={s.N}, P={s.P}, H={s.H})")


def _shape_dims(args: argparse.Namespace) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in args.dim or ():
        name, _, value = item.partition("=")
        if not value.isdigit():
            raise SsmcError(f"--dim expects NAME=INT, got {item!r}")
        dims[name] = int(value)
    return dims


def _cmd_explain(args: argparse.Namespace) -> int:
    from ssmc.cost import Shape
    from ssmc.pipeline import parse_file
    from ssmc.plan import explain
    from ssmc.summary import dump

    checked = parse_file(args.file)
    print(dump(checked))
    print()
    dims = {d.name: d.value for d in checked.spec.dims if d.value is not None}
    dims.update(_shape_dims(args))
    missing = _unbound(checked, dims)
    if missing:
        raise SsmcError("dims bound at call time need values here: "
                        + ", ".join(f"--dim {m}=..." for m in missing))
    from ssmc.algebra_fuse import fused_checked

    fused = fused_checked(checked) if checked.pieces else None
    if fused is not None:  # a sum that runs as one op with K·H heads: plan that op
        H, KH = checked.heads.output, fused.heads.output
        if isinstance(H, str) and isinstance(KH, str) and KH not in dims:
            dims[KH] = len(checked.pieces) * dims[H]
        checked = fused
    shape = Shape(batch=args.batch, seqlen=args.seqlen, dims=dims, dtype_bytes=args.dtype_bytes)
    print(explain(checked, shape, args.device))
    return 0


def _unbound(checked: object, dims: dict[str, int]) -> list[str]:
    spec = checked.spec  # type: ignore[attr-defined]
    used = {a for t in spec.tensors for a in t.shape if isinstance(a, str)}
    used |= {a for a in spec.output.shape if isinstance(a, str)}
    return sorted(used - set(dims) - {"batch", "seq"})


def _cmd_run(args: argparse.Namespace) -> int:
    from ssmc.run import run_spec

    report = run_spec(args.file, seqlen=args.seqlen, batch=args.batch, dims=_shape_dims(args),
                      form=args.form, chunk_size=args.chunk_size, dtype=args.dtype,
                      device=args.device)
    print(report)
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from ssmc.load import compile_to_file

    path = compile_to_file(args.file, args.output, force=args.force)
    print(f"wrote {path}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from ssmc.pipeline import parse_file, with_dims
    from ssmc.show import matrices, png, text

    checked = with_dims(parse_file(args.file), _shape_dims(args))
    drawn = matrices(checked, seqlen=args.seqlen, chunk_size=args.chunk_size, seed=args.seed)
    if args.png:
        print(f"wrote {png(drawn, args.png, heads=args.heads or 2)}")
    else:
        print(text(drawn, heads=args.heads or 1))
    return 0


def _add_show(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    show = sub.add_parser(
        "show", help="draw the mask L and the matrix M = L ∘ C Bᵀ for a small T",
        description="Compute the mask L and the full matrix M = L ∘ C Bᵀ of every head from "
        "random fp64 inputs (ssmc's reference) at a small T, with the chunks outlined and the "
        "rank of each off-diagonal block (the semiseparable structure): as text, or as a PNG "
        "with --png (needs matplotlib: pip install 'ssmc[plot]').",
        epilog="examples:\n  ssmc show examples/mamba2.ssm --seqlen 12 --dim N=2\n"
        "  ssmc show examples/gla.ssm --png gla.png --seqlen 24 --chunk-size 8 --dim N=3")
    show.add_argument("file", help="a .ssm spec")
    show.add_argument("--png", metavar="PATH", help="draw a PNG here instead of printing text")
    show.add_argument("--seqlen", "-T", type=int, default=16, help="sequence length T (default 16)")
    show.add_argument("--chunk-size", "-Q", type=int,
                      help="chunk length Q of the outlined blocks (default T/4, at least 2)")
    show.add_argument("--heads", type=int,
                      help="how many heads to show (default: 1 as text, 2 in a PNG)")
    show.add_argument("--dim", action="append", metavar="NAME=INT",
                      help="rebind a dim (e.g. N=2 to see rank-2 blocks); repeatable")
    show.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    show.set_defaults(handler=_cmd_show)


def _cmd_autotune(args: argparse.Namespace) -> int:
    import json

    from ssmc.autotune import autotune

    shapes = [_batch_by_seqlen(text) for text in args.shape or ("2x1024",)]
    reports = []
    for batch, seqlen in shapes:
        result = autotune(args.file, batch=batch, seqlen=seqlen, dims=_shape_dims(args),
                          num_seqs=args.num_seqs, dtype=args.dtype, cache_dir=args.cache_dir,
                          search=False if args.no_search else None, store=not args.no_store,
                          progress=not args.no_progress, backward=args.backward)
        print(f"{result.key.device}, batch {batch} × seqlen {seqlen}, {result.key.dtype}:")
        print("  " + result.table().replace("\n", "\n  "))
        if result.path is not None:
            print(f"  stored in {result.path}")
        reports.append({"batch": batch, "seqlen": seqlen, "winner": _jsonable(result.winner),
                        "ratio": result.ratio, "key": _jsonable(result.key)})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(reports, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def _batch_by_seqlen(text: str) -> tuple[int, int]:
    """`BATCHxSEQLEN` (or ×, or a comma) → (batch, seqlen), both ≥ 1."""
    parts = text.lower().replace("×", "x").replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise SsmcError(f"--shape expects BATCHxSEQLEN with positive ints (e.g. 8x2048), "
                        f"got {text!r}")
    return int(parts[0]), int(parts[1])


def _jsonable(value: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(value)


def _add_autotune(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tune = sub.add_parser(
        "autotune", help="time every form, chunk and tile on this GPU and cache the fastest",
        description="For each --shape, run every form the spec allows at its default tiles "
        "(the chunked form at Q = 64, 128, 256), then vary each form's launch options (tiles, "
        "warps, stages) one at a time from its fastest; a candidate whose output disagrees "
        "with the fp64 reference beyond its dtype's bound is rejected. The winner is stored in "
        "the autotune cache ($SSMC_CACHE_DIR/autotune.json), keyed by GPU, shape bucket, spec "
        "and versions; ssmc.load's op runs it for every call in that bucket (--backward: its "
        "backward's options too). Without a GPU, "
        "TRITON_INTERPRET=1 runs the same path on tiny shapes (docs/autotune.md).",
        epilog="examples:\n  ssmc autotune examples/mamba2.ssm --shape 8x2048 --shape 1x16384\n"
        "  TRITON_INTERPRET=1 ssmc autotune examples/mamba2.ssm --shape 1x32 "
        "--dim H=2 --dim N=16 --dim P=16")
    tune.add_argument("file", help="a .ssm spec")
    tune.add_argument("--shape", action="append", metavar="BATCHxSEQLEN",
                      help="a call shape to tune (repeatable; default 2x1024)")
    tune.add_argument("--dim", action="append", metavar="NAME=INT",
                      help="a call-time dim's size, or a spec dim rebound (repeatable)")
    tune.add_argument("--num-seqs", type=int, default=1,
                      help="pack this many uneven sequences with cu_seqlens (batch must be 1)")
    tune.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                      help="dtype of the per-token inputs (default: bfloat16 on a GPU, float32 "
                      "under the interpreter)")
    tune.add_argument("--cache-dir", metavar="DIR", help="cache folder (default: $SSMC_CACHE_DIR "
                      "or ~/.cache/ssmc)")
    tune.add_argument("--no-search", action="store_true",
                      help="time the forms and chunks at default tiles only")
    tune.add_argument("--backward", action="store_true",
                      help="also tune the fused backward's launch options (walk steps, head "
                      "splits, warps) for the winner, each checked against fp64 gradients")
    tune.add_argument("--no-store", action="store_true", help="measure, but keep nothing")
    tune.add_argument("--json", metavar="PATH", help="write the winners as JSON here")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune.set_defaults(handler=_cmd_autotune)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command (also used to test `--help`)."""
    parser = argparse.ArgumentParser(
        prog="ssmc",
        description="Compile structured masked attention / state-space specs (.ssm) into "
        "Triton kernels and PyTorch ops.",
    )
    parser.add_argument("--log", default=None, metavar="LEVEL",
                        help="logging level: debug, info, warning, error "
                        "(default: $SSMC_LOG or warning)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser("check", help="parse, validate and symbolically prove a spec",
                           description="Parse, lower and check FILE, print a summary, and "
                           "prove with SymPy that every form the structure allows equals M.")
    check.add_argument("file", help="a .ssm spec")
    check.add_argument("--no-proof", action="store_true", help="skip the symbolic proof")
    check.add_argument("--proof-T", type=int, default=6, help="sequence length of the proof")
    check.set_defaults(handler=_cmd_check)

    explain = sub.add_parser("explain", help="IR, per-form cost and the planner's choice",
                             description="Print the IR and, for every allowed form, FLOPs, "
                             "bytes and state memory at a shape, and the form the cost model "
                             "picks on a device.")
    explain.add_argument("file", help="a .ssm spec")
    explain.add_argument("--seqlen", "-T", type=int, default=4096, help="sequence length T")
    explain.add_argument("--batch", "-b", type=int, default=1, help="batch size")
    explain.add_argument("--device", default="H100", help="device rates to plan for")
    explain.add_argument("--dtype-bytes", type=int, default=2, help="bytes per input element")
    explain.add_argument("--dim", action="append", metavar="NAME=INT",
                         help="bind a dim the spec leaves to call time")
    explain.set_defaults(handler=_cmd_explain)

    run = sub.add_parser("run", help="compile, run on random inputs, check against fp64",
                         description="Compile FILE, run it on random inputs, compare with the "
                         "fp64 PyTorch reference, print the form, error and time. Without a GPU "
                         "the kernels run under the Triton interpreter (TRITON_INTERPRET=1) or "
                         "the PyTorch reference.")
    run.add_argument("file", help="a .ssm spec")
    run.add_argument("--seqlen", "-T", type=int, default=64, help="sequence length T")
    run.add_argument("--batch", "-b", type=int, default=2, help="batch size")
    run.add_argument("--dim", action="append", metavar="NAME=INT",
                     help="override a dim (smaller sizes for CPU runs)")
    run.add_argument("--form", choices=["recurrent", "quadratic", "chunked", "convolution"],
                     help="force a form")
    run.add_argument("--chunk-size", type=int, help="force a chunk size")
    run.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                     help="dtype of the inputs (default float32; bfloat16 needs a GPU)")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    run.set_defaults(handler=_cmd_run)

    comp = sub.add_parser("compile", help="write a standalone module (torch + triton only)",
                          description="Render FILE into a standalone Python module that "
                          "imports with only torch and triton installed.")
    comp.add_argument("file", help="a .ssm spec")
    comp.add_argument("-o", "--output", required=True, help="where to write the module")
    comp.add_argument("--force", action="store_true",
                      help="replace an existing file that ssmc did not write")
    comp.set_defaults(handler=_cmd_compile)
    _add_show(sub)
    add_bench(sub)
    _add_autotune(sub)
    _finish_help(parser, sub)
    return parser


EXAMPLES = {
    "check": "ssmc check examples/mamba2.ssm\n  ssmc check --no-proof examples/gla.ssm",
    "explain": "ssmc explain examples/mamba2.ssm --seqlen 16384 --batch 1",
    "run": "TRITON_INTERPRET=1 ssmc run examples/mamba2.ssm --seqlen 64 --dim H=4 --dim P=16 "
    "--dim N=16\n  ssmc run examples/gla.ssm --seqlen 4096 --dtype bfloat16   # on a GPU",
    "compile": "ssmc compile examples/mamba2.ssm -o mamba2_op.py",
}
"""One or two command lines per sub-command, shown under its --help."""


class _HelpFormatter(argparse.HelpFormatter):
    """Fills each paragraph of a description or epilog; indented lines (examples) stay as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        paragraph: list[str] = []
        for line in [*text.splitlines(), None]:
            if line and not line.startswith(" "):
                paragraph.append(line.strip())
                continue
            if paragraph:
                out.append(super()._fill_text(" ".join(paragraph), width, indent))
                paragraph = []
            if line is not None:
                out.append(indent + line if line.strip() else "")
        return "\n".join(out)


def _finish_help(parser: argparse.ArgumentParser,
                 sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Every parser fills its text and keeps its examples; a sub-command without an
    epilog of its own gets its EXAMPLES entry."""
    parser.formatter_class = _HelpFormatter
    parser.epilog = parser.epilog or ("example:\n  ssmc check examples/mamba2.ssm\n\n"
                                      "Run `ssmc COMMAND --help` for a command's options. "
                                      "$SSMC_LOG=info logs compiles, cache hits and plans.")
    for name, command in sub.choices.items():
        command.formatter_class = _HelpFormatter
        if not command.epilog and name in EXAMPLES:
            command.epilog = "example:\n  " + EXAMPLES[name]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ssmc` and `python -m ssmc`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except SsmcError as err:
        print(str(err), file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as err:
        print(f"{err.filename}: error: no such file", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception:
        print("ssmc: internal error (this is a bug in ssmc; please report it with the "
              "spec and the command):", file=sys.stderr)
        print(traceback.format_exc(limit=-3), file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
