"""Injection: hostile spec text never reaches generated code, and never runs.

The corpus `tests/specs/hostile/*.ssm` holds spec text carrying Python and Jinja2
payloads, quotes, control characters, dunder chains, names that collide with builtins,
modules, kernel locals and launcher parameters, huge and tiny numbers, deep nesting,
unicode look-alikes and bidi controls, very long names and files. The file name says
what must happen:

- `ok_*`: a valid spec; it checks, renders, loads and runs on CPU;
- `err_*`: a clean `SpecError` whose diagnostics carry a location;
- `any_*`: either of the two (names whose fix may go either way; none at present).

Payloads write a marker file (`touch @MARKER@`, the placeholder replaced by a fresh
path per test): the marker must be absent after parse, check, render, load and a call.
While a spec is processed an audit hook records process spawns, sockets, deletions and
writes outside the cache and temp folders: there must be none. For `ok_*` specs the
rendered module is the same as that of the spec with its comments removed, holds no
control, bidi or zero-width character, no payload substring, and every identifier in
it comes from the templates or is a declared name (possibly with its `b_`, `p_`, `s_`,
`d_`, `arg_` prefix, or `eb_`, `ep_`, `es_`, `ed_` in the tile epilogue). Static checks at the end pin the ownership rules of CONVENTIONS:
only render.py imports jinja2, and no eval/exec/compile/sympify/parse_expr/pickle
outside load.py.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import os
import re
import secrets
import sys
import tempfile
import unicodedata
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ssmc import ir, render
from ssmc.errors import SpecError, visible
from ssmc.load import load
from ssmc.lower import RESERVED_NAMES
from ssmc.pipeline import normalize_newlines, parse, parse_file
from ssmc.reference import random_inputs
from ssmc.reserved import RESERVED_PREFIX, RESERVED_TENSOR_NAMES

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = ROOT / "tests" / "specs" / "hostile"
CORPUS = sorted(CORPUS_DIR.glob("*.ssm"))
STEMS = [p.stem for p in CORPUS]
PLACEHOLDER = b"@MARKER@"

KNOWN_BUGS: dict[str, str] = {}
"""Open bugs (docs/hardening.md), by corpus file: strict xfails until fixed (none open)."""

# Problems that have no place in the text (something is missing): no location needed.
UNLOCATED_OK = ("the spec is empty", "declares no", "characters long; the limit")
# Never in a rendered module: payload fragments and characters that hide or reorder text.
FORBIDDEN_SUBSTRINGS = (
    "@MARKER@",
    "pwned",
    "__import__",
    "system(",
    "popen",
    "subprocess",
    "eval(",
    "exec(",
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    "__class__",
    "__mro__",
    "__globals__",
    "__subclasses__",
    "getattr(",
    "lipsum",
)
BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
INVISIBLE = set("\u200b\u200c\u200d\u2060\ufeff")
SPAWN_EVENTS = {
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.fork",
    "os.forkpty",
    "subprocess.Popen",
    "pty.spawn",
    "socket.connect",
    "socket.bind",
    "webbrowser.open",
    "os.kill",
    "os.killpg",
    "os.startfile",
    "shutil.rmtree",
    "os.rmdir",
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


# --- the audit hook ---------------------------------------------------------------------

_watch: dict[str, object] = {"on": False, "events": [], "allowed": ()}


def _audit(event: str, args: tuple[object, ...]) -> None:
    if not _watch["on"]:
        return
    events = _watch["events"]
    assert isinstance(events, list)
    if event in SPAWN_EVENTS:
        events.append(f"{event} {args!r:.200}")
    elif event in ("open", "os.remove", "os.rename") and args and isinstance(args[0], str | bytes):
        path = os.path.abspath(os.fsdecode(args[0]))
        if event == "open":
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if not writes:
                return
        allowed = _watch["allowed"]
        assert isinstance(allowed, tuple)
        if not any(path.startswith(a) for a in allowed):
            events.append(f"{event} {path}")


@contextmanager
def watched(*allowed: Path) -> Iterator[list[str]]:
    """Record spawns, sockets and writes outside `allowed` (and the temp folders).

    The hook is installed on first use (audit hooks cannot be removed; it does nothing
    while no `watched` block is open)."""
    if not _watch.get("installed"):
        sys.addaudithook(_audit)
        _watch["installed"] = True
    events: list[str] = []
    roots = [*allowed, Path(tempfile.gettempdir()), Path.home() / ".triton", Path.home() / ".cache"]
    _watch.update(on=True, events=events, allowed=tuple(str(p.resolve()) for p in roots))
    try:
        yield events
    finally:
        _watch.update(on=False)


def test_the_watch_sees_spawns_and_writes(tmp_path: Path) -> None:
    """The audit hook itself: a spawn and a write outside the allowed folders are seen."""
    with watched(tmp_path) as events:
        os.system("true")
        (tmp_path / "allowed").write_text("fine")
        _audit("open", ("/etc/ssmc-probe", "w", 0))
        _audit("open", ("/etc/ssmc-probe", None, os.O_WRONLY | os.O_CREAT))
        _audit("open", ("/etc/hostname", "r", 0))
    assert any(e.startswith("os.system") for e in events), events
    assert sum(e == "open /etc/ssmc-probe" for e in events) == 2, events
    assert not any("allowed" in e or "hostname" in e for e in events), events


# --- helpers ----------------------------------------------------------------------------


def marker_path(tmp_path: Path) -> Path:
    return tmp_path / f"pwned_{secrets.token_hex(8)}"


def armed(path: Path, tmp_path: Path, marker: Path) -> Path:
    """The corpus file with its marker placeholder replaced, written under tmp_path."""
    target = tmp_path / path.name
    target.write_bytes(path.read_bytes().replace(PLACEHOLDER, str(marker).encode()))
    return target


def strip_comments(text: str) -> str:
    return re.sub(r"#[^\n]*", "", text)


def assert_clean_spec_error(err: SpecError) -> None:
    """A SpecError is clean: diagnostics, no traceback, located unless nothing is to point at."""
    assert err.diagnostics
    rendered = err.render()
    assert "Traceback" not in rendered and rendered.strip()
    located = [d for d in err.diagnostics if d.span is not None]
    if not located:
        assert all(any(m in d.message for m in UNLOCATED_OK) for d in err.diagnostics), rendered
    for d in located:
        assert d.span is not None and d.span.line >= 1 and d.span.column >= 1
        assert f":{d.span.line}:{d.span.column}: error: " in rendered


def template_vocabulary() -> frozenset[str]:
    words: set[str] = set()
    for path in (ROOT / "templates").glob("*.jinja"):
        words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", path.read_text()))
    return frozenset(words) | frozenset(dir(builtins))


TEMPLATE_WORDS = template_vocabulary()
GENERATED = re.compile(
    r"[A-Za-z]+_?\d+(_s\d+|_blk|_sum)?|y_s\d+|y_blk|_st_[a-z]\d+"
    r"|(prologue|epilogue)(_(log_gamma|log_a|s|x|B|C|kernel|lti_A|lti_B|lti_C|lti_dt))*"
    r"_((fwd|bwd)_)?(kernel|launch)"
)
"""Identifiers the generator builds itself: numbered temporaries, axes, results and their
strides, and elementwise kernels named after the core roles they compute."""


def example_vocabulary() -> frozenset[str]:
    """Identifiers of the modules rendered from examples/ (trusted specs, plain names)."""
    words: set[str] = set()
    for path in sorted((ROOT / "examples").glob("*.ssm")):
        checked = parse_file(path)
        for module in checked.pieces or (checked,):  # a composite mask: one module per piece
            source = render.render_module(module)
            words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", source))
    return frozenset(words)


TEMPLATE_WORDS = TEMPLATE_WORDS | example_vocabulary()


def declared_names(checked: ir.CheckedSpec) -> set[str]:
    spec = checked.spec
    return {
        spec.name,
        spec.output.name,
        *(d.name for d in spec.dims),
        *(t.name for t in spec.tensors),
    }


def identifier_from(word: str, names: set[str]) -> bool:
    """`word` is a declared name, or one with the prefixes/suffixes the generator adds."""
    if word in names:
        return True
    for prefix in ("b_", "p_", "d_", "arg_", "eb_", "ep_", "ed_", "fp_", "fd_"):
        if word.startswith(prefix) and word[len(prefix) :] in names:
            return True
    match = re.fullmatch(r"(?:e?s|fs|fb)_(.+)_\d+", word)  # fs_, fb_: the fused decode's
    return bool(match and match.group(1) in names)


def assert_clean_source(source: str, checked: ir.CheckedSpec) -> None:
    """The rendered module: plain characters, no payload, identifiers from known places."""
    for i, char in enumerate(source):
        if char == "\n":
            continue
        category = unicodedata.category(char)
        assert category not in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp"), (
            f"character {char!r} at {i} in the rendered module"
        )
        assert char not in BIDI and char not in INVISIBLE
    lowered = source.lower()
    for bad in FORBIDDEN_SUBSTRINGS:
        assert bad.lower() not in lowered, f"{bad!r} in the rendered module"
    tree = ast.parse(source)
    names = declared_names(checked)
    strange = set()
    for node in ast.walk(tree):
        words: list[str] = []
        if isinstance(node, ast.Name):
            words = [node.id]
        elif isinstance(node, ast.arg):
            words = [node.arg]
        elif isinstance(node, ast.Attribute):
            words = [node.attr]
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            words = [node.name]
        elif isinstance(node, ast.keyword) and node.arg:
            words = [node.arg]
        elif isinstance(node, ast.alias):
            words = [node.name.split(".")[0], *([node.asname] if node.asname else [])]
        for word in words:
            if word not in TEMPLATE_WORDS and not GENERATED.fullmatch(word):
                if not identifier_from(word, names):
                    strange.add(word)
    assert not strange, f"identifiers from nowhere in the rendered module: {sorted(strange)[:10]}"


def corpus_params(stems: list[str], bugs: dict[str, str]) -> list[object]:
    return [
        pytest.param(s, marks=pytest.mark.xfail(reason=bugs[s], strict=True)) if s in bugs else s
        for s in stems
    ]


# --- the corpus ---------------------------------------------------------------------------


def test_corpus_is_large_and_covers_both_outcomes() -> None:
    assert len(CORPUS) >= 50
    kinds = {s.split("_")[0] for s in STEMS}
    assert {"ok", "err"} <= kinds <= {"ok", "err", "any"}, kinds
    assert sum(s.startswith("ok_") for s in STEMS) >= 20
    assert sum(s.startswith("err_") for s in STEMS) >= 50
    assert set(KNOWN_BUGS) <= set(STEMS)
    payloads = sum(PLACEHOLDER in p.read_bytes() for p in CORPUS)
    assert payloads >= 10


@pytest.fixture(scope="module")
def cache_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ssmc-injection-") as folder:
        yield Path(folder).resolve()


@pytest.mark.interpret
@pytest.mark.parametrize("stem", corpus_params(STEMS, KNOWN_BUGS))
def test_hostile_spec(stem: str, tmp_path: Path, cache_dir: Path) -> None:
    marker = marker_path(tmp_path)
    path = armed(CORPUS_DIR / f"{stem}.ssm", tmp_path, marker)
    with watched(cache_dir, tmp_path) as events:
        try:
            checked = parse_file(path)
        except SpecError as err:
            assert not stem.startswith("ok_"), err.render()
            assert_clean_spec_error(err)
            assert not marker.exists() and not events
            return
        assert not stem.startswith("err_"), "a hostile spec that must be refused was accepted"
        assert not marker.exists()
        source = render.render_module(checked)
        assert not marker.exists()
        assert_clean_source(source, checked)
        text = path.read_text(encoding="utf-8")
        bare = render.render_module(parse(strip_comments(text), "bare.ssm"))
        assert source == bare, "comments changed the rendered module"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            op = load(checked, cache_dir=cache_dir)
            assert not marker.exists()
            inputs = random_inputs(checked, batch=1, seqlen=3, dtype=torch.float32)
            inputs.pop("initial_state", None)
            y, _ = op(**inputs)
        assert y.shape[:2] == (1, 3) and torch.isfinite(y).all()
    assert not marker.exists(), "a payload ran"
    assert not events, f"unexpected side effects: {events}"


@pytest.mark.parametrize("stem", [s for s in STEMS if s != "err_invalid_utf8"])
def test_string_and_file_apis_agree(stem: str, tmp_path: Path) -> None:
    """ssmc.parse(text) and ssmc.parse_file(path) give the same spec or the same errors
    (both end lines at \\n, \\r\\n and a lone \\r: docs/language.md)."""
    path = armed(CORPUS_DIR / f"{stem}.ssm", tmp_path, marker_path(tmp_path))
    text = path.read_bytes().decode("utf-8")

    def outcome(run: object) -> object:
        try:
            checked = run()  # type: ignore[operator]
        except SpecError as err:
            return [(d.message, d.span) for d in err.diagnostics]
        except Exception as err:
            return type(err).__name__
        return render.spec_hash(checked)

    assert outcome(lambda: parse(text, str(path))) == outcome(lambda: parse_file(path))


ERR_STEMS = [s for s in STEMS if s.startswith("err_") and s not in KNOWN_BUGS]


def _diagnostics(stem: str, tmp_path: Path) -> tuple[SpecError, str]:
    """The error of a corpus file and its text (bytes that are not UTF-8 shown as U+FFFD)."""
    path = armed(CORPUS_DIR / f"{stem}.ssm", tmp_path, marker_path(tmp_path))
    with pytest.raises(SpecError) as info:
        parse_file(path)
    return info.value, path.read_bytes().decode("utf-8", errors="replace")


@pytest.mark.parametrize("stem", ERR_STEMS)
def test_diagnostics_show_the_line_they_name(stem: str, tmp_path: Path) -> None:
    """The line under a diagnostic is the one lark counted to (lines end at \\n only, once
    \\r\\n and \\r are normalised), shown with its hidden characters escaped."""
    err, text = _diagnostics(stem, tmp_path)
    lines = normalize_newlines(text).split("\n")
    for d in err.diagnostics:
        if d.span is None or d.span.line > len(lines):
            continue
        shown = d.render("hostile.ssm", text).split("\n")
        assert len(shown) >= 2
        assert shown[1] == "    " + visible(lines[d.span.line - 1]), (shown[1], d.span)


@pytest.mark.parametrize("stem", ERR_STEMS)
def test_diagnostics_are_safe_to_print(stem: str, tmp_path: Path) -> None:
    """No control or bidi character of the spec reaches the terminal through a diagnostic."""
    err, _ = _diagnostics(stem, tmp_path)
    rendered = err.render()
    bad = [c for c in rendered if c != "\n" and (unicodedata.category(c) == "Cc" or c in BIDI)]
    assert not bad, f"{bad!r} in {rendered!r}"


# --- generated hostile names --------------------------------------------------------------

EXTRA = 24
"""Params [H] summed into the skip: more names per spec, each read inside a kernel."""
SLOTS = ("x", "dt", "B", "C", "z", "A", "D", *(f"w{i}" for i in range(EXTRA)))
TEMPLATE = (
    "ssm {name}\n"
    "dim H = 2, N = 4, P = 4\n"
    "input {x}  : [batch, seq, H, P]\n"
    "input {dt} : [batch, seq, H]\n"
    "input {B}  : [batch, seq, H, N]\n"
    "input {C}  : [batch, seq, H, N]\n"
    "input {z}  : [batch, seq, H, P]\n"
    "param {A}  : [H]\n"
    "param {D}  : [H]\n"
    + "".join(f"param {{w{i}}} : [H]\n" for i in range(EXTRA))
    + "output y : [batch, seq, H, P]\n"
    "mask semiseparable(log_a = softplus({dt}) * {A})\n"
    "query {C}\n"
    "key   {B}\n"
    "value {x} * softplus({dt})\n"
    "skip  {D} * {x} * (" + " + ".join(f"{{w{i}}}" for i in range(EXTRA)) + ")\n"
    "gate  silu({z})\n"
)
RESERVED_BY_DESIGN = RESERVED_TENSOR_NAMES
"""Refused by check (tests/specs/hostile/err_tensor_named_*); tested there."""
TAKEN = {"H", "N", "P", "y"}
"""Declared by TEMPLATE itself."""


def code_identifiers() -> set[str]:
    """Identifiers the code (not the comments) of the example modules uses."""
    words: set[str] = set()
    modules = [m for p in sorted((ROOT / "examples").glob("*.ssm"))
               for m in (parse_file(p).pieces or (parse_file(p),))]  # composite: its pieces
    for module in modules:
        tree = ast.parse(render.render_module(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                words.add(node.id)
            elif isinstance(node, ast.arg):
                words.add(node.arg)
            elif isinstance(node, ast.FunctionDef):
                words.add(node.name)
            elif isinstance(node, ast.Attribute):
                words.add(node.attr)
    return words


def hostile_names() -> list[str]:
    """Every builtin, every identifier a generated module or its kernels use, and more."""
    words = set(dir(builtins)) | code_identifiers() | {"tl", "triton", "torch", "math", "os", "sys"}
    words = {
        w
        for w in words
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", w)
        and not keyword.iskeyword(w)
        and not w.startswith("__")
        and w not in RESERVED_NAMES
        and w not in RESERVED_BY_DESIGN | TAKEN
        and not w.startswith(RESERVED_PREFIX)
    }
    return sorted(words)


HOSTILE_NAMES = hostile_names()
BATCHES = [
    HOSTILE_NAMES[i : i + len(SLOTS) + 1] for i in range(0, len(HOSTILE_NAMES), len(SLOTS) + 1)
]
"""The spec's name and its tensors, per spec."""


def test_names_cover_builtins_and_kernel_locals() -> None:
    names = set(HOSTILE_NAMES)
    assert {
        "print",
        "open",
        "eval",
        "exec",
        "tl",
        "triton",
        "torch",
        "math",
        "sizes",
        "tensors",
    } <= names
    assert {"o_r", "m_r", "i_b", "BLOCK_R", "n_rows"} <= names
    assert len(names) > 300


def test_reserved_names_cover_what_render_and_the_op_take() -> None:
    """ssmc/reserved.py is the one list: every name the renderer refuses and every argument
    of the op's call and schemas (besides the tensors) is in it, so check refuses them all."""
    import inspect

    from ssmc import ops

    assert set(render.FORWARD_KEYWORDS) <= RESERVED_TENSOR_NAMES
    call = inspect.signature(ops.SsmcOp.__call__).parameters
    free = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.POSITIONAL_ONLY)
    taken = {n for n, p in call.items() if p.kind not in free}
    assert taken <= RESERVED_TENSOR_NAMES, taken - RESERVED_TENSOR_NAMES
    checked = parse(TEMPLATE.format(name="s", **dict(zip(SLOTS, SLOTS, strict=True))))
    tree = ast.parse(render.render_module(checked))
    tensors = {t.name for t in checked.spec.tensors}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("forward", "backward"):
            args = node.args
            words = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)}
            assert tensors <= words and words - tensors <= RESERVED_TENSOR_NAMES, (
                node.name, words - tensors - RESERVED_TENSOR_NAMES)
    schemas = ops.schema(checked) + ops.backward_schema(checked)
    arguments = set(re.findall(r"(\w+)(?=[=,)])", schemas)) - {"None", "False", "Tensor"}
    arguments -= set(ops.schema_names(checked))
    assert arguments and arguments <= RESERVED_TENSOR_NAMES, arguments - RESERVED_TENSOR_NAMES
    for name in sorted(RESERVED_TENSOR_NAMES) + [RESERVED_PREFIX + "_x"]:
        text = TEMPLATE.format(name="s", **dict(zip(SLOTS, [name, *SLOTS[1:]], strict=True)))
        with pytest.raises(SpecError, match=f"`{name}` cannot name a tensor") as info:
            parse(text, "reserved.ssm")
        assert_clean_spec_error(info.value)


@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: b[0])
def test_colliding_names_render_to_valid_python(batch: list[str]) -> None:
    """Names that collide with builtins, module globals and kernel locals: the module
    renders, parses as Python and keeps every identifier accounted for."""
    spare = [f"spare{i}" for i in range(len(SLOTS))]
    names = dict(zip(SLOTS, batch[1:] + spare, strict=False))
    text = TEMPLATE.format(name=batch[0], **names)
    checked = parse(text, "names.ssm")
    source = render.render_module(checked)
    assert_clean_source(source, checked)
    compile(source, "names.py", "exec", dont_inherit=True)


# --- ownership rules (CONVENTIONS: one owner per dangerous thing) --------------------------

SOURCES = sorted((ROOT / "ssmc").rglob("*.py"))


def _calls_and_imports(path: Path) -> Iterator[tuple[str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield f"import {alias.name.split('.')[0]}", node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield f"import {node.module.split('.')[0]}", node.lineno
            for alias in node.names:
                yield f"name {alias.name}", node.lineno
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                yield f"call {func.id}", node.lineno
            elif isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else "?"
                yield f"call {owner}.{func.attr}", node.lineno
                yield f"attr {func.attr}", node.lineno


def test_only_render_imports_jinja2() -> None:
    found = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in SOURCES
        for what, line in _calls_and_imports(p)
        if what == "import jinja2" and p.name != "render.py"
    ]
    assert not found, found
    assert any(
        what == "import jinja2" for what, _ in _calls_and_imports(ROOT / "ssmc" / "render.py")
    )


def test_no_evaluation_of_text_outside_the_loader() -> None:
    """eval/exec/compile/__import__, sympify/parse_expr, pickle/marshal loads: load.py only
    (exec/compile of generated files and its own sealed caches), sympify nowhere."""
    banned_calls = {"call eval", "call exec", "call compile", "call __import__"}
    banned_loads = {
        "call pickle.loads",
        "call pickle.load",
        "call marshal.loads",
        "call marshal.load",
    }
    banned_anywhere = {
        "attr sympify",
        "call sympify",
        "name sympify",
        "attr parse_expr",
        "call parse_expr",
        "name parse_expr",
    }
    found = []
    for path in SOURCES:
        for what, line in _calls_and_imports(path):
            where = f"{path.relative_to(ROOT)}:{line}: {what}"
            if what in banned_anywhere:
                found.append(where)
            elif what in banned_calls | banned_loads and path.name != "load.py":
                found.append(where)
    assert not found, found
    text = "\n".join(p.read_text(encoding="utf-8") for p in SOURCES if p.name != "load.py")
    assert not re.search(r"(?<![\w.])(eval|exec)\(", text)
    assert not re.search(r"\b(sympify|parse_expr)\(", text)


def test_loader_executes_only_files_it_sealed() -> None:
    """load.py's exec runs code compiled from a cache entry whose seal was checked."""
    source = (ROOT / "ssmc" / "load.py").read_text(encoding="utf-8")
    assert source.count("exec(") == 1 and "exec(_compiled(path), module.__dict__)" in source
    assert "_read_sealed(path" in source
