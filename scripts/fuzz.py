"""Fuzz the front end and the renderer with generated and mutated `.ssm` specs.

Three hypothesis strategies, shared with tests/test_fuzz_specs.py:

- `grammar_spec`: syntactically valid specs built the way grammar/ssm.lark builds them —
  a header, dims (bound, unbound, out of range), inputs and params whose shapes follow a
  head pattern, an output, lets, one mask of any kind with its keyword arguments, roles
  from random expressions (numbers in every spelling, names, the five operators, the
  twelve functions), flags, statements in random order, random blanks and comments.
  Most check; many are refused for a reason in the text (a wrong axis, a head count
  that does not divide, an unused tensor...).
- `mutated_example`: an `examples/*.ssm` file with tokens and lines deleted, duplicated,
  swapped or replaced (by keywords, names of the same spec, extreme numbers, punctuation,
  hostile text, unicode look-alikes).
- `hostile_spec`: a valid spec with hostile names and payloads put in its slots.

The only accepted outcomes of a text are a checked spec whose module renders (and
compiles as Python), or a `SpecError` with at least one located diagnostic (a spec that
*lacks* something — empty, no mask — may have none). Anything else is a bug.

    python scripts/fuzz.py --count 100000 --seed 1 --out fuzz-out

prints a JSON tally (count, seconds, seed, outcomes) and exits 1 if any outcome was
unexpected; the first reproducer of every unexpected outcome is written under --out.
Outcomes that match a bug already reported (docs/hardening.md) are tallied as `known:*`;
`--known` also draws the names and numbers that trigger them. A text that takes more
than --timeout seconds is `known:slow-plan` when it binds a dim of 10⁴ or more, else
unexpected.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ssmc import render  # noqa: E402
from ssmc.errors import SpecError  # noqa: E402
from ssmc.pipeline import parse  # noqa: E402

EXAMPLES = {
    p.stem: p.read_text(encoding="utf-8") for p in sorted((ROOT / "examples").glob("*.ssm"))
}
# fmt: off
FUNCTIONS = {
    "exp": 1, "log": 1, "softplus": 1, "sigmoid": 1, "logsigmoid": 1, "silu": 1, "tanh": 1,
    "sqrt": 1, "abs": 1, "clamp": 3, "min": 2, "max": 2,
}
KEYWORDS = (
    "ssm", "dim", "input", "param", "output", "let", "mask", "query", "key", "value", "skip",
    "gate", "initial_state", "final_state", "varlen",
)
MASKS = ("causal", "const_decay", "semiseparable", "diagonal", "toeplitz", "lti")
FLAGS = ("initial_state", "final_state", "varlen")
# Names a careful user might pick, and names that collide with what generated code uses.
PLAIN_NAMES = ("x", "y", "z", "B", "C", "A", "D", "dt", "q", "k", "v", "g", "w", "K", "Cp", "Bp", "u")
HOSTILE_NAMES = (
    "print", "open", "eval", "exec", "tl", "triton", "torch", "math", "sizes", "tensors",
    "out", "device", "grid", "o_r", "m_r", "i_b", "BLOCK_R", "n_rows", "t_0", "b_x", "p_x",
    "s_x_0", "forward", "prologue_fwd", "SPEC_NAME", "FORMS", "_bind", "Tensor", "int", "str",
    "float", "complex", "match", "case", "type", "_", "lambda_", "x__", "gamma", "a", "log_a",
    "kernel", "hippo", "legs", "zoh", "N" * 300, "H" + "_" * 50, "self", "arg_out", "n" * 250,
)
# Triggers of the known bugs (docs/hardening.md "Open bugs"): only with --known. None open.
KNOWN_BUG_NAMES: tuple[str, ...] = ()
RESERVED = (
    "batch", "seq", "inf", "exp", "lambda", "None", "class", "__x", "__class__", "mask",
    "form", "chunk_size", "cu_seqlens", "grad_y", "launch", "_ssmc_run",
)
HOSTILE_TEXT = (
    "__import__('os').system('touch /tmp/ssmc_fuzz_pwned')", "{{ 7*7 }}", "{% if 1 %}", "{#",
    '"""', "'", "\\", ";", "\x00", "\r", "\f", "\x0b", "\x1b[2J", "\u202e", "\u200d", "\ufeff",
    "\u0430", "\uff58", "\u2028", "\x85", ".__class__.__mro__", "[0]", "@", "`", "$", "==", ":=",
)
EXTREME_NUMBERS = (
    "0", "1", "1e308", "1.7976931348623157e308", "1e400", "4.9e-324", "1e-400",
    "99999999999999999999999", "0.000000000000000000001", ".5", "5.", "1E+1", "2e-0",
    "16777217", "0000008", "65535", "1" + "0" * 4400,
)
KNOWN_NUMBERS = ("16777216", "1048576")
# fmt: on


@dataclass(frozen=True)
class Pools:
    """What the generators draw names and numbers from."""

    names: tuple[str, ...]
    numbers: tuple[str, ...]


def pools(known: bool = False) -> Pools:
    names = PLAIN_NAMES + HOSTILE_NAMES + (KNOWN_BUG_NAMES if known else ())
    numbers = EXTREME_NUMBERS + (KNOWN_NUMBERS if known else ())
    return Pools(names=names, numbers=numbers)


# --- expressions -----------------------------------------------------------------------


def number_text(draw: st.DrawFn, extreme: tuple[str, ...]) -> str:
    """A NUMBER token in one of the spellings the grammar allows."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.sampled_from(extreme))
    if kind == 1:
        return str(draw(st.integers(0, 10**6)))
    value = draw(st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False))
    if kind == 2:
        return repr(value)
    if kind == 3:
        return f"{value:.3e}"
    if kind == 4:
        return f"{value:.4f}".lstrip("0") or "0"
    return f"{int(value)}."


@st.composite
def expression(
    draw: st.DrawFn, names: tuple[str, ...], extreme: tuple[str, ...], depth: int = 3
) -> str:
    """A random expression over `names` following the grammar's precedence levels."""
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        if names and draw(st.booleans()):
            return draw(st.sampled_from(names))
        if draw(st.integers(0, 9)) == 0:
            return "inf"
        return number_text(draw, extreme)
    kind = draw(st.integers(0, 5))
    sub = expression(names, extreme, depth - 1)
    if kind == 0:
        fn = draw(st.sampled_from(sorted(FUNCTIONS)))
        args = [draw(sub) for _ in range(FUNCTIONS[fn])]
        return f"{fn}({', '.join(args)})"
    if kind == 1:
        return f"-{draw(sub)}"
    if kind == 2:
        return f"({draw(sub)})"
    op = draw(st.sampled_from(["+", "-", "*", "/", "**"]))
    return f"{draw(sub)} {op} {draw(sub)}"


# --- grammar-driven specs ---------------------------------------------------------------


@dataclass
class Spec:
    """Statements of a generated spec, in categories so they can be ordered legally."""

    name: str
    decls: list[str] = field(default_factory=list)
    lets: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)


MISTAKES = (
    "dim value",
    "axis",
    "number",
    "flag",
    "role",
    "name",
    "unused",
    "heads",
    "let order",
)
"""One deliberate slip a grammar spec may carry (else it is meant to check)."""
GOOD_SIZES = ("1", "2", "3", "4", "8", "16", "64")
BAD_SIZES = ("0", "16777217", "99999999999999999999999")


def _wrap(draw: st.DrawFn, core: str, scalars: list[str], numbers: tuple[str, ...]) -> str:
    """A role expression around `core` that keeps its axes: scaled, shifted, a function."""
    choice = draw(st.integers(0, 6))
    extra = draw(st.sampled_from(scalars))
    if choice == 0:
        return core
    if choice == 1:
        return f"{core} * {number_text(draw, numbers)}"
    if choice == 2:
        return f"{core} / sqrt({extra})"
    if choice == 3:
        return f"{draw(st.sampled_from(['silu', 'tanh', 'sigmoid', 'abs', 'exp']))}({core})"
    if choice == 4:
        return f"clamp({core}, -inf, {number_text(draw, numbers)})"
    if choice == 5:
        return f"{core} * {extra} + {number_text(draw, numbers)}"
    return f"({core}) ** {draw(st.sampled_from(['2', '1', '0.5', '-1', '3']))}"


@st.composite
def grammar_spec(draw: st.DrawFn, pool: Pools | None = None) -> str:
    """A syntactically valid spec of any mask kind and head pattern.

    Without a drawn mistake the spec is meant to check (H = G·k so every count divides);
    with one (a bad dim value, a wrong axis, an extreme number, a flag the mask refuses, a
    random role, a reserved name, an unused tensor, a count that does not divide, a let
    used before it is defined) it is meant to fail for that reason.
    """
    pool = pool or pools()
    mistake = draw(st.sampled_from(MISTAKES)) if draw(st.integers(0, 3)) == 0 else None
    numbers = pool.numbers if mistake == "number" else ("0.5", "2", "1e-3", "0.125", "3.")
    names = pool.names + (RESERVED if mistake == "name" else ())
    taken: set[str] = set()

    def fresh(default: str) -> str:
        name = default if draw(st.integers(0, 3)) else draw(st.sampled_from(names))
        while name in taken:
            name = f"{name}_{len(taken)}"
        taken.add(name)
        return name

    spec = Spec(name=fresh("layer"))
    H, G, N, P, L = (fresh(n) for n in ("H", "G", "N", "P", "L"))
    g = int(draw(st.sampled_from(GOOD_SIZES[:5])))
    sizes = {H: str(g * int(draw(st.sampled_from(("1", "2", "4"))))), G: str(g)}
    for dim in (N, P, L):
        sizes[dim] = draw(st.sampled_from(GOOD_SIZES))
    if mistake == "dim value":
        sizes[draw(st.sampled_from([H, G, N, P, L]))] = draw(st.sampled_from(BAD_SIZES))
    if mistake == "heads":
        sizes[G] = str(int(sizes[H]) + 1)
    dims = [d if draw(st.integers(0, 5)) == 0 else f"{d} = {sizes[d]}" for d in (H, G, N, P, L)]
    spec.decls.append("dim " + ", ".join(dims))
    mask = draw(st.sampled_from(MASKS))
    toeplitz = mask in ("toeplitz", "lti")
    p_axis = draw(st.sampled_from([P, P, P, "1"]))

    def heads() -> str:
        return draw(st.sampled_from([H, H, G, "1"]))

    x, x_heads = fresh("x"), heads()
    spec.decls.append(f"input {x} : [batch, seq, {x_heads}, {p_axis}]")
    tensors, scalars = [x], [N, P, H]
    q = k = None
    if not toeplitz:
        q, k = fresh("C"), fresh("B")
        spec.decls.append(f"input {q} : [batch, seq, {heads()}, {N}]")
        spec.decls.append(f"input {k} : [batch, seq, {heads()}, {N}]")
        tensors += [q, k]
    dt, A = fresh("dt"), fresh("A")
    decay = None
    if mask == "const_decay":
        spec.decls.append(f"param {A} : [{H}]")
        arg = draw(st.sampled_from(["gamma", "log_gamma"]))
        value = draw(st.sampled_from([f"sigmoid({A})", "0.9", f"-softplus({A})", f"0.5 + 0 * {A}"]))
        decay = f"{arg} = {value}"
        tensors.append(A)
    elif mask in ("semiseparable", "diagonal"):
        spec.decls.append(f"input {dt} : [batch, seq, {H}]")
        spec.decls.append(f"param {A} : [{H}{', ' + N if mask == 'diagonal' else ''}]")
        arg = draw(st.sampled_from(["a", "log_a"]))
        inner = draw(
            st.sampled_from(
                [
                    f"softplus({dt}) * {A}",
                    f"-exp({A}) * softplus({dt})",
                    f"logsigmoid({dt}) * abs({A})",
                    f"-softplus({dt} + {A})",
                ]
            )
        )
        decay = f"{arg} = {'exp(' + inner + ')' if arg == 'a' else inner}"
        tensors += [dt, A]
    elif mask == "toeplitz":
        K = fresh("K")
        spec.decls.append(f"param {K} : [{draw(st.sampled_from([H, '1']))}, {L}]")
        decay = f"kernel = {draw(st.sampled_from([K, f'tanh({K})', f'{K} * 0.5']))}"
        tensors.append(K)
    elif mask == "lti":
        Cp, log_dt = fresh("Cp"), fresh("log_dt")
        spec.decls.append(f"param {Cp} : [{H}, {N}]")
        spec.decls.append(f"param {log_dt} : [{H}]")
        tensors += [Cp, log_dt]
        if draw(st.booleans()):
            decay = f"hippo = {draw(st.sampled_from(['legs', 'legt', 'lagt']))}, C = {Cp}"
        else:
            Bp = fresh("Bp")
            spec.decls.append(f"param {A} : [{H}, {N}]")
            spec.decls.append(f"param {Bp} : [{H}, {N}]")
            tensors += [A, Bp]
            decay = f"A = -exp({A}), B = {Bp}, C = {Cp}"
        decay += f", dt = exp({log_dt})"
        if draw(st.booleans()):
            decay += f", discretize = {draw(st.sampled_from(['zoh', 'bilinear']))}"
    y = fresh("y")
    spec.decls.append(f"output {y} : [batch, seq, {H}, {p_axis}]")
    value = _wrap(draw, x, scalars, numbers)
    if draw(st.booleans()):
        let = fresh("scaled")
        spec.lets.append(f"let {let} = {value}")
        value = let
    if mask == "causal":
        spec.body.append(draw(st.sampled_from(["mask causal", "mask causal()"])))
    else:
        spec.body.append(f"mask {mask}({decay})")
    if q is not None and k is not None:
        spec.body.append(f"query {_wrap(draw, q, scalars, numbers)}")
        spec.body.append(f"key {_wrap(draw, k, scalars, numbers)}")
    spec.body.append(f"value {value}")
    if draw(st.booleans()):
        D = fresh("D")
        spec.decls.append(f"param {D} : [{H}]")
        spec.body.append(f"skip {D} * {x}" if x_heads == H else f"skip {D}")
        tensors.append(D)
    if draw(st.booleans()):
        z = fresh("z")
        spec.decls.append(f"input {z} : [batch, seq, {H}, {p_axis}]")
        spec.body.append(f"gate {draw(st.sampled_from(['silu', 'sigmoid', 'tanh']))}({z})")
        tensors.append(z)
    flags = [f for f in FLAGS if draw(st.integers(0, 2)) == 0]
    if toeplitz and mistake != "flag":
        flags = [f for f in flags if f == "varlen"]
    if mistake == "flag":
        flags.append(draw(st.sampled_from(FLAGS)))
    spec.body += flags
    if mistake == "axis":
        w = fresh("w")
        spec.decls.append(f"input {w} : [batch, seq, {N}, {P}]")
        spec.body = [f"{s} * {w}" if s.startswith("value ") else s for s in spec.body]
    elif mistake == "role":
        role = draw(st.sampled_from(["query", "key", "value", "skip", "gate"]))
        spec.body = [s for s in spec.body if not s.startswith(role + " ")]
        expr = draw(expression(tuple(tensors) + (N, H), pool.numbers))
        spec.body.append(f"{role} {expr}")
    elif mistake == "unused":
        spec.decls.append(f"param {fresh('unused')} : [{H}]")
    elif mistake == "let order" and spec.lets:
        spec.body, spec.lets = spec.body + spec.lets, []
    if draw(st.integers(0, 4)) == 0:
        spec.lets.append(
            f"let {fresh('extra')} = {draw(expression(tuple(tensors) + (N,), numbers))}"
        )
    return _layout(draw, spec)


def _layout(draw: st.DrawFn, spec: Spec) -> str:
    """Statements in a legal order (lets before the roles), blanks and comments at random."""
    decls = draw(st.permutations(spec.decls))
    body = draw(st.permutations(spec.body))
    split = draw(st.integers(0, len(decls)))
    statements = [*decls[:split], *spec.lets, *decls[split:], *body]
    lines = [f"ssm {spec.name}"]
    for statement in statements:
        if draw(st.integers(0, 6)) == 0:
            lines.append("# " + draw(st.sampled_from(HOSTILE_TEXT[:8] + ("a comment",))))
        tail = draw(st.sampled_from(["", "", "", "  # " + statement[:20], "\t"]))
        if draw(st.integers(0, 8)) == 0:
            statement = statement.replace(" ", draw(st.sampled_from(["\t", "  ", "\n  ", "\f"])), 2)
        lines.append(statement + tail)
    newline = draw(st.sampled_from(["\n", "\n", "\n", "\r\n", "\n\n"]))
    return newline.join(lines) + newline


# --- mutated examples -------------------------------------------------------------------

TOKEN = re.compile(
    r"#[^\n]*|[A-Za-z_][A-Za-z0-9_]*|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?\.?|\*\*|\s+|."
)


@st.composite
def mutated_example(draw: st.DrawFn, pool: Pools | None = None) -> str:
    """An example with 1–6 token or line mutations."""
    pool = pool or pools()
    name = draw(st.sampled_from(sorted(EXAMPLES)))
    tokens = TOKEN.findall(EXAMPLES[name])
    own = sorted({t for t in tokens if re.fullmatch(r"[A-Za-z_]\w*", t)})
    replacements = st.sampled_from(
        own
        + list(KEYWORDS)
        + list(MASKS)
        + list(FUNCTIONS)
        + list(pool.names)
        + list(RESERVED)
        + list(pool.numbers)
        + list(HOSTILE_TEXT)
        + list("()[],:=*/+-\n")
        + ["**", "1", "2.5"]
    )
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 7))
        if not tokens:
            break
        i = draw(st.integers(0, len(tokens) - 1))
        if kind == 0:
            del tokens[i]
        elif kind == 1:
            tokens.insert(i, tokens[i])
        elif kind in (2, 3):
            tokens[i] = draw(replacements)
        elif kind == 4:
            tokens.insert(i, draw(replacements))
        elif kind == 5:
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        else:
            text = "".join(tokens)
            lines = text.split("\n")
            a, b = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if kind == 6:
                lines[a], lines[b] = lines[b], lines[a]
            else:
                other = EXAMPLES[draw(st.sampled_from(sorted(EXAMPLES)))].split("\n")
                lines.insert(a, other[draw(st.integers(0, len(other) - 1))])
            tokens = TOKEN.findall("\n".join(lines))
    return "".join(tokens)


@st.composite
def hostile_spec(draw: st.DrawFn, pool: Pools | None = None) -> str:
    """A valid spec (linear attention with a gate) whose slots hold hostile names/text."""
    pool = pool or pools()
    names = draw(st.lists(st.sampled_from(pool.names + RESERVED), min_size=5, max_size=5))
    payload = draw(st.sampled_from(HOSTILE_TEXT))
    slot = draw(st.integers(0, 6))
    q, k, v, g, out = names
    text = (
        f"ssm s\ndim H = 2, N = 4, P = 4\ninput {q} : [batch, seq, H, N]\n"
        f"input {k} : [batch, seq, H, N]\ninput {v} : [batch, seq, H, P]\n"
        f"input {g} : [batch, seq, H, P]\noutput {out} : [batch, seq, H, P]\n"
        f"mask causal\nquery {q}\nkey {k}\nvalue {v}\ngate silu({g})\n"
    )
    lines = text.split("\n")
    where = draw(st.integers(0, len(lines) - 1))
    if slot == 0:
        lines[where] += " # " + payload
    elif slot == 1:
        lines[where] += payload
    elif slot == 2:
        cut = draw(st.integers(0, len(lines[where])))
        lines[where] = lines[where][:cut] + payload + lines[where][cut:]
    return "\n".join(lines)


# --- outcomes -----------------------------------------------------------------------------

ABSENT = ("the spec is empty", "declares no", "characters long; the limit")
KNOWN = {
    # needle in the exception or its traceback: tally key (bugs listed in docs/hardening.md)
    "in _distinct": "known:call-time-group-above-64",
}
SLOW_HEADS = re.compile(r"\b\d{5,}\b")
"""A dim value of 10⁴ or more: the planner loops over every head (known:slow-plan)."""


class Unexpected(AssertionError):
    """A text gave an outcome other than a rendered module or a located SpecError."""


class Timeout(Exception):
    """One text took longer than the fuzzer's limit."""


def outcome(text: str, compile_source: bool = True) -> str:
    """ "ok", or "error:<pass>"; raise Unexpected (or anything else) otherwise.

    A checked spec is rendered once per distinct IR (mutations often keep the IR) and,
    with `compile_source`, its module compiled as Python.
    """
    try:
        checked = parse(text, "fuzz.ssm")
    except SpecError as err:
        rendered = err.render()
        if not err.diagnostics or "Traceback" in rendered:
            raise Unexpected(f"a SpecError without diagnostics: {rendered!r}") from err
        located = any(d.span is not None for d in err.diagnostics)
        if not located and not all(any(a in d.message for a in ABSENT) for d in err.diagnostics):
            raise Unexpected(f"no diagnostic is located: {rendered}") from err
        return f"error:{type(err).__name__}"
    key = render.spec_hash(checked)
    if key not in _RENDERED:
        for module in checked.pieces or (checked,):  # a composite mask: one module per piece
            source = render.render_module(module)
            if compile_source:
                compile(source, "module.py", "exec", dont_inherit=True)
        _RENDERED.add(key)
    return "ok"


_RENDERED: set[str] = set()


def classify(text: str, timeout: int = 0, compile_source: bool = True) -> tuple[str, str | None]:
    """(tally key, traceback or None): outcome() with every exception turned into a key.

    With `timeout` (seconds, main thread only) a text that takes longer is a `Timeout`.
    """

    def expire(signum: int, frame: object) -> None:
        raise Timeout(f"took more than {timeout} s")

    previous = signal.signal(signal.SIGALRM, expire) if timeout else None
    if timeout:
        signal.alarm(timeout)
    try:
        return outcome(text, compile_source), None
    except Exception as err:  # noqa: BLE001 - a fuzzer tallies every failure
        trace = traceback.format_exc()
        if isinstance(err, Timeout) and SLOW_HEADS.search(text):
            return "known:slow-plan", None
        for needle, key in KNOWN.items():
            if needle in trace:
                return key, None
        message = f"{type(err).__name__}: {err}"
        first = message.splitlines()[0] if message else type(err).__name__
        return "unexpected:" + re.sub(r"\d+", "N", first)[:120], trace
    finally:
        if timeout:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)


# --- the dedicated run ----------------------------------------------------------------------


def sweep(
    label: str,
    strategy: st.SearchStrategy[str],
    count: int,
    seed: int,
    record: Callable[[str, str], None],
) -> None:
    """Draw `count` texts from `strategy` (generation only: no shrinking, no database)."""

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def each(text: str) -> None:
        record(label, text)

    each()


def run(
    count: int,
    seed: int,
    out: Path | None,
    known: bool,
    timeout: int = 60,
    progress: int = 0,
) -> dict[str, object]:
    """Draw `count` texts (2/5 grammar, 2/5 mutated, 1/5 hostile) and tally their outcomes;
    every `progress` texts a JSON line of the tally so far goes to stderr."""
    pool = pools(known)
    tally: collections.Counter[str] = collections.Counter()
    by_strategy: dict[str, collections.Counter[str]] = {}
    saved: set[str] = set()
    strategies = {
        "grammar": grammar_spec(pool),
        "mutated": mutated_example(pool),
        "hostile": hostile_spec(pool),
    }
    shares = {"grammar": count * 2 // 5, "mutated": count * 2 // 5}
    shares["hostile"] = count - sum(shares.values())

    def record(label: str, text: str) -> None:
        key, trace = classify(text, timeout)
        tally[key] += 1
        done = sum(tally.values())
        if progress and done % progress == 0:
            elapsed = round(time.perf_counter() - started, 1)
            print(
                json.dumps({"done": done, "seconds": elapsed, **tally}), file=sys.stderr, flush=True
            )
        by_strategy.setdefault(label, collections.Counter())[key] += 1
        if trace is not None and out is not None and key not in saved:
            saved.add(key)
            out.mkdir(parents=True, exist_ok=True)
            stem = f"{label}_{len(saved):03d}"
            (out / f"{stem}.ssm").write_text(text, encoding="utf-8", errors="surrogateescape")
            (out / f"{stem}.txt").write_text(f"{key}\n\n{trace}", encoding="utf-8")

    started = time.perf_counter()
    for label, strategy in strategies.items():
        sweep(label, strategy, shares[label], seed, record)
    seconds = time.perf_counter() - started
    return {
        "count": sum(tally.values()),
        "seconds": round(seconds, 1),
        "seed": seed,
        "known_bug_triggers": known,
        "timeout_s": timeout,
        "outcomes": dict(tally.most_common()),
        "by_strategy": {k: dict(v.most_common()) for k, v in by_strategy.items()},
        "unexpected": sum(v for k, v in tally.items() if k.startswith("unexpected:")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="specs to try (all strategies)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder for reproducers")
    parser.add_argument("--known", action="store_true", help="also draw known-bug triggers")
    parser.add_argument("--timeout", type=int, default=60, help="seconds one text may take")
    parser.add_argument("--progress", type=int, default=1000, help="tally to stderr every N")
    args = parser.parse_args(argv)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    report = run(args.count, args.seed, args.out, args.known, args.timeout, args.progress)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 1 if report["unexpected"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
