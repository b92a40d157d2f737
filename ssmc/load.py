"""Load generated modules: the only module that writes or imports generated code.

`load(spec)` parses and checks a spec, renders its module, keeps it in an on-disk cache
keyed by the IR (spans stripped), the ssmc/Triton/torch versions and the templates, and
returns an `SsmcOp`. Cache entries end with a trailer holding the sha256 of the body, so
a truncated or garbled entry is detected and rebuilt; writes go to a temporary file in
the same folder, are fsynced and renamed into place under a file lock, so concurrent
processes never see half a file. `compile_to_file` writes a standalone module.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import marshal
import os
import pickle
import sys
import tempfile
import types
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from ssmc import render
from ssmc.errors import CacheError, SsmcError
from ssmc.ir import CheckedSpec

if TYPE_CHECKING:
    from ssmc.ops import SsmcOp

TRAILER = "# ssmc-sha256: "
ENTRY_NAME_CHARS = 64
"""How much of the spec name a cache entry's file names keep (the key makes them unique)."""
_log = logging.getLogger(__name__)
_MODULES: dict[str, types.ModuleType] = {}


class OverwriteError(SsmcError, FileExistsError):
    """`compile -o` would overwrite a file that ssmc did not write."""


def load(
    spec: CheckedSpec | str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> SsmcOp:
    """Parse/check `spec` (a CheckedSpec, a `.ssm` path or spec text) and return its op."""
    from ssmc.ops import SsmcOp

    checked = as_checked(spec, cache_dir=cache_dir)
    if checked.pieces:  # a composite mask (docs/variants.md): one op per piece
        from ssmc.algebra_ops import CompositeOp

        return CompositeOp(checked, cache_dir=cache_dir)  # type: ignore[return-value]
    return SsmcOp(checked, load_module(checked, cache_dir=cache_dir))


def as_checked(
    spec: CheckedSpec | str | os.PathLike[str], *, cache_dir: str | os.PathLike[str] | None = None
) -> CheckedSpec:
    """A CheckedSpec from itself, spec text, or a `.ssm` path (its IR is cached on disk).

    The IR of a file is kept beside the modules, keyed by the file's path and text and
    ssmc's sources, so a later process skips parsing.
    """
    if isinstance(spec, CheckedSpec):
        return spec
    # The front end (lark) is imported only when a spec must really be parsed.
    from ssmc import pipeline

    if isinstance(spec, str) and ("\n" in spec or spec.lstrip().startswith("ssm ")):
        return pipeline.parse(spec)
    try:
        text = Path(spec).read_bytes()
    except OSError:
        return pipeline.parse_file(Path(spec))
    key = hashlib.sha256(
        b"\0".join([os.fsencode(os.path.abspath(spec)), text, _build_id().encode()])
    ).hexdigest()
    path = _folder(cache_dir) / f"ir_{key[:32]}.pickle"
    try:
        payload = path.read_bytes()
        body, digest = payload[:-64], payload[-64:].decode("ascii", "replace")
        if hashlib.sha256(body).hexdigest() == digest:
            checked = pickle.loads(body)
            if isinstance(checked, CheckedSpec):
                return checked
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError):
        pass
    checked = pipeline.parse_file(Path(spec))
    body = pickle.dumps(checked, protocol=pickle.HIGHEST_PROTOCOL)
    _write_atomic(path, body + hashlib.sha256(body).hexdigest().encode())
    return checked


@functools.cache
def _build_id() -> str:
    """ssmc, Triton and torch versions and the digest of ssmc's own sources."""
    versions = render.tool_versions()
    return "\0".join(
        [versions["ssmc"], versions["triton"], versions["torch"], render.build_digest()]
    )


def cache_key(checked: CheckedSpec) -> str:
    """sha256 of what determines the generated text: the IR without spans, versions, sources."""
    return hashlib.sha256(f"{render.stable_repr(checked)}\0{_build_id()}".encode()).hexdigest()


def _folder(cache_dir: str | os.PathLike[str] | None) -> Path:
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheError(f"cannot create the cache folder {folder}: {err}") from err
    return folder


def default_cache_dir() -> Path:
    """`$SSMC_CACHE_DIR`, else `~/.cache/ssmc`."""
    configured = os.environ.get("SSMC_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "ssmc"


def load_module(
    checked: CheckedSpec, *, cache_dir: str | os.PathLike[str] | None = None
) -> types.ModuleType:
    """The generated module of `checked`: from this process, the disk cache, or rendered."""
    key = cache_key(checked)
    if key in _MODULES:
        return _MODULES[key]
    # The key tells entries apart; the name is for people, cut so that every file of the
    # entry (`.py`, `.lock`, `.code`, `.<entry>.<random>.tmp`) stays well under 255 bytes.
    name = checked.spec.name[:ENTRY_NAME_CHARS]
    path = _folder(cache_dir) / f"{name}_{key[:24]}.py"
    if _read_sealed(path, warn=True) is None:
        with FileLock(str(path) + ".lock"):
            # Another process may have written it while this one waited for the lock.
            if _read_sealed(path, warn=False) is None:
                _log.info("cache miss: rendering %s into %s", checked.spec.name, path)
                _write_atomic(path, seal(render.render_module(checked)))
    else:
        _log.info("cache hit: %s from %s", checked.spec.name, path)
    module = _import_file(path, f"_ssmc_{name}_{key[:16]}", cache_code=True)
    _MODULES[key] = module
    return module


def seal(source: str) -> str:
    """`source` followed by the trailer line holding the sha256 of everything before it."""
    if not source.endswith("\n"):
        source += "\n"
    return f"{source}{TRAILER}{hashlib.sha256(source.encode()).hexdigest()}\n"


def unseal(text: str) -> str | None:
    """The body of a sealed text, or None when the trailer is missing or does not match."""
    body, sep, digest = text.rstrip("\n").rpartition("\n" + TRAILER)
    if not sep:
        return None
    body += "\n"
    return body if hashlib.sha256(body.encode()).hexdigest() == digest else None


def _read_sealed(path: Path, *, warn: bool) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError):
        text = ""
    body = unseal(text)
    if body is None and warn:
        warnings.warn(
            f"ssmc: the cached module {path} is damaged; rebuilding it",
            RuntimeWarning,
            stacklevel=3,
        )
    return body


def _write_atomic(path: Path, data: str | bytes) -> None:
    """Write `data` to `path` all at once: temporary file in the same folder, fsync, rename."""
    payload = data.encode() if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise CacheError(f"cannot write {path}: {err}") from err


def compile_to_file(
    spec: CheckedSpec | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    force: bool = False,
) -> Path:
    """Write the standalone module of `spec` to `out_path` (imports only torch and triton).

    Refuses to replace a file that ssmc did not write, unless `force`.
    """
    checked = as_checked(spec)
    path = Path(out_path)
    if path.exists() and not force:
        with open(path, encoding="utf-8", errors="replace") as f:
            first = f.readline()
        if not first.startswith(render.MARKER):
            raise OverwriteError(
                f"{path} exists and was not written by ssmc; pass --force to replace it"
            )
    _write_atomic(path, seal(render.render_module(checked)))
    return path


def load_source(source: str, name: str) -> types.ModuleType:
    """Import `source` as a module called `name` (for testing stage templates).

    The text is written to a real file first: `triton.jit` reads a kernel's source
    through `inspect`, which needs the file on disk.
    """
    render.identifier(name)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"ssmc-src-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{digest}.py"
    if not path.exists() or path.read_text(encoding="utf-8") != source:
        _write_atomic(path, source)
    return _import_file(path, f"_ssmc_src_{name}_{digest}")


def _import_file(path: Path, module_name: str, *, cache_code: bool = False) -> types.ModuleType:
    """Import the file at `path`; with `cache_code`, its compiled code is kept beside it.

    Python's own bytecode cache is often off (PYTHONDONTWRITEBYTECODE), and compiling a
    generated module is most of a cached load, so the cache keeps `<entry>.code`: the
    interpreter's magic number, the sha256 of the source, then the marshalled code.
    """
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CacheError(f"cannot import the generated module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        if cache_code:
            exec(_compiled(path), module.__dict__)
        else:
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _compiled(path: Path) -> types.CodeType:
    source = path.read_bytes()
    header = importlib.util.MAGIC_NUMBER + hashlib.sha256(source).digest()
    code_path = path.with_name(path.name + ".code")
    try:
        data = code_path.read_bytes()
        if data.startswith(header):
            code = marshal.loads(data[len(header) :])
            if isinstance(code, types.CodeType):
                return code
    except (OSError, ValueError, EOFError, TypeError):
        pass
    code = compile(source, str(path), "exec", dont_inherit=True)
    _write_atomic(code_path, header + marshal.dumps(code))
    return code
