"""SSD at the Mamba-2 2.7B layer shape: ssmc against mamba_ssm and FLA in one run.

H = 80, P = 64, N = 128, G = 1 (examples/mamba2.ssm), bf16 x/B/C/z, fp32 dt/A;
batch·T = 16384 tokens, T ∈ {2048, 4096, 8192, 16384}. A thin wrapper over
`ssmc bench` (ssmc/bench.py), which checks every series against the fp64 reference,
times plain calls and CUDA-graph replays, and writes the JSON report (and a plot).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssmc.cli import main as ssmc_main

ROOT = Path(__file__).resolve().parent.parent
SEQLENS = "2048,4096,8192,16384"
TOKENS = 16384


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mamba-src", default=None, help="unpacked mamba-ssm sdist folder")
    parser.add_argument("--json", default="bench_ssd.json", help="where to write the report")
    parser.add_argument("--png", default=None, help="plot time versus T here (needs matplotlib)")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    args = parser.parse_args(argv)
    command = ["bench", str(ROOT / "examples" / "mamba2.ssm"), "--seqlen", SEQLENS,
               "--tokens", str(TOKENS), "--forms", "chunked,planner", "--peers", "mamba,fla",
               "--json", args.json, "--no-progress"]
    if args.mamba_src:
        command += ["--mamba-src", args.mamba_src]
    if args.png:
        command += ["--png", args.png]
    if args.backward:
        command.append("--backward")
    return ssmc_main(command)


if __name__ == "__main__":
    sys.exit(main())
