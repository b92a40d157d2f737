"""`ssmc bench`'s report as a table (text) and a plot (PNG: time versus T per series)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ssmc.errors import SsmcError


def best_ms(timing: Mapping[str, Any] | None) -> float | None:
    """The CUDA-graph median where there is one, else the plain median (None: not timed)."""
    if not timing:
        return None
    graph = timing.get("graph_ms")
    return float(graph) if graph is not None else float(timing["plain_ms"])


def table(report: Mapping[str, Any]) -> str:
    """One line per (shape, series): times, memory, error, share of the floor, ratio to ssmc."""
    head = [f"{report['spec']} on {report['device']} ({report['date']}), {report['dtype']}, "
            f"torch {report['torch']}, triton {report['triton']}, ssmc {report['ssmc']}"]
    roof = report.get("roofline")
    if roof:
        head.append(f"roofline: copy {roof['copy_GBps']:.0f} GB/s, bf16 matmul "
                    f"{roof['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    head += [f"note: {n}" for n in report.get("notes", [])]
    timed = "graph" if any(_get(r, "fwd", "graph_ms") for r in report["results"]) else "plain"
    cols = (f"{'batch':>5} {'T':>6}  {'series':<26}{'form':<10}{'fwd ms':>9}{'plain ms':>10}"
            f"{'f+b ms':>9}{'peak MiB':>10}{'max err':>10}{'floor':>7}{'vs ssmc':>8}")
    lines = [*head, f"(ms: CUDA-graph medians where measured, else plain; {timed} shown)", cols]
    fastest = _fastest_ssmc(report["results"])
    for r in report["results"]:
        fwd = best_ms(r["fwd"])
        ours = fastest.get((r["batch"], r["T"]))
        ratio = f"{fwd / ours:.2f}x" if fwd and ours and r["kind"] == "peer" else ""
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        if r["ok"] is False:
            err += "!"
        lines.append(
            f"{r['batch']:>5} {r['T']:>6}  {r['series']:<26}{str(r['form'] or ''):<10}"
            f"{_ms(fwd):>9}{_ms(_get(r, 'fwd', 'plain_ms')):>10}{_ms(best_ms(r['fwd_bwd'])):>9}"
            f"{_num(_get(r, 'fwd', 'peak_mib')):>10}{err:>10}"
            f"{_pct(r.get('of_floor')):>7}{ratio:>8}"
        )
        if r["error"]:
            lines.append(f"{'':>14}error: {r['error']}")
    lines.append("max err: ‖out − ref‖/‖ref‖ vs fp64 (! over the bound); floor: share of the "
                 "time to move inputs and outputs once; vs ssmc: peer time / fastest ssmc")
    return "\n".join(lines)


def _fastest_ssmc(results: list[dict[str, Any]]) -> dict[tuple[int, int], float]:
    out: dict[tuple[int, int], float] = {}
    for r in results:
        t = best_ms(r["fwd"])
        if r["kind"] == "ssmc" and t is not None and r["ok"]:
            key = (r["batch"], r["T"])
            out[key] = min(out.get(key, math.inf), t)
    return out


def _get(r: Mapping[str, Any], part: str, key: str) -> Any:
    return (r.get(part) or {}).get(key)


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.0f}"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def plot(report: Mapping[str, Any], path: str | Path) -> Path:
    """Time versus T (log-log), one line per series; forward, and forward+backward if timed."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FormatStrFormatter, NullLocator, ScalarFormatter
    except ImportError:
        raise SsmcError("drawing PNGs needs matplotlib: pip install 'ssmc[plot]' "
                        "(the JSON report does not)") from None
    parts = [("fwd", "forward")]
    if any(r["fwd_bwd"] for r in report["results"]):
        parts.append(("fwd_bwd", "forward + backward"))
    fig = Figure(figsize=(6.2 * len(parts), 4.8), layout="constrained")
    axes = fig.subplots(1, len(parts), squeeze=False)[0]
    for ax, (part, title) in zip(axes, parts, strict=True):
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for r in report["results"]:
            t = best_ms(r[part])
            if t is not None:
                series[r["series"]].append((r["T"], t))
        for name, points in series.items():
            points.sort()
            style = ("-.o" if name.endswith("planner") else "-o") if name.startswith("ssmc") \
                else "--s"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=name,
                    markersize=4)
        floors = sorted({(r["T"], r["floor_ms"]) for r in report["results"] if r.get("floor_ms")})
        if floors and part == "fwd":
            ax.plot([f[0] for f in floors], [f[1] for f in floors], ":", color="0.4",
                    label="floor (inputs + outputs at copy bandwidth)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        seqlens = sorted({r["T"] for r in report["results"]})
        ax.set_xticks(seqlens, [str(T) for T in seqlens])
        ax.xaxis.set_minor_locator(NullLocator())
        # plain numbers on the log y axis: a narrow range otherwise shows a single 10^0 tick
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("time per call, ms")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    batches = sorted({(r["T"], r["batch"]) for r in report["results"]})
    tokens = {T * b for T, b in batches}
    size = (f"batch·T = {tokens.pop()}" if len(tokens) == 1 else
            "batch " + ", ".join(str(b) for _, b in batches))
    fig.suptitle(f"{report['spec']} on {report['device']}, {report['dtype']}, {size}\n"
                 f"{report['date']}, torch {report['torch']}, triton {report['triton']}",
                 fontsize=9)
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out
