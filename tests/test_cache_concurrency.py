"""The on-disk cache under concurrency, killed writers and damaged files.

- 16 processes `ssmc.load` one spec into one fresh SSMC_CACHE_DIR at the same instant
  (they import everything first, then wait on a start file): all succeed, with the same
  module, and the cache holds one sealed entry and no temporary file.
- A process SIGKILLed while it writes an entry (stopped inside the write, before the
  rename, or while holding the entry's lock) leaves nothing a later load trusts: the
  later load neither deadlocks nor imports a partial file, and writes a sealed entry.
- Writers killed at random moments of a stream of loads leave only sealed entries.
- A truncated, garbled, emptied or forged entry (and a garbled compiled-code or IR file)
  is detected, rebuilt, and reported once: one warning for the load that finds it,
  none for the next.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

import ssmc
from ssmc.pipeline import parse

L = importlib.import_module("ssmc.load")
ROOT = Path(__file__).resolve().parent.parent
SPEC = """\
ssm cache_probe
dim H = 4, G = 2, N = 8, P = 4
input x  : [batch, seq, H, P]
input dt : [batch, seq, H]
input B  : [batch, seq, G, N]
input C  : [batch, seq, G, N]
param A  : [H]
output y : [batch, seq, H, P]
mask semiseparable(log_a = softplus(dt) * A)
query C
key   B
value x * softplus(dt)
final_state
"""
PROCESSES = 16


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ, SSMC_CACHE_DIR=str(cache), TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _spawn(code: str, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=_env(cache),
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("*.py"))


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited early: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the child never reached the write")
        time.sleep(0.02)


def _assert_sealed(cache: Path) -> None:
    """Every entry in the cache is whole (its seal matches); no partial file is an entry."""
    for entry in _entries(cache):
        assert L.unseal(entry.read_text(encoding="utf-8", errors="replace")) is not None, entry


def _fresh_load(cache: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, list[str]]:
    """Load SPEC as a new process would (no module kept in memory); return op and warnings."""
    monkeypatch.setattr(L, "_MODULES", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = ssmc.load(parse(SPEC), cache_dir=cache)
    return op, [str(w.message) for w in caught if "ssmc" in str(w.message)]


# --- many processes, one entry ------------------------------------------------------------


def test_sixteen_processes_load_one_spec_at_once(tmp_path: Path) -> None:
    cache, spec_file, go = tmp_path / "cache", tmp_path / "probe.ssm", tmp_path / "go"
    spec_file.write_text(SPEC)
    code = f"""
        import json, time, warnings
        from pathlib import Path
        import torch, triton, ssmc
        import ssmc.render, ssmc.ops, ssmc.pipeline
        ready = Path({str(tmp_path)!r}) / f"ready_{{__import__('os').getpid()}}"
        ready.write_text("")
        while not Path({str(go)!r}).exists():
            time.sleep(0.005)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op = ssmc.load({str(spec_file)!r})
        print(json.dumps({{
            "hash": op.module.SPEC_HASH,
            "file": op.module.__file__,
            "warnings": [str(w.message) for w in caught if "ssmc" in str(w.message)],
        }}))
    """
    procs = [_spawn(code, cache) for _ in range(PROCESSES)]
    deadline = time.monotonic() + 180
    while len(list(tmp_path.glob("ready_*"))) < PROCESSES:
        assert all(p.poll() is None for p in procs), "a process died before the start"
        assert time.monotonic() < deadline, "the processes never got ready"
        time.sleep(0.05)
    go.write_text("")
    results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0] * PROCESSES, [e[-2000:] for _, _, e in results]
    reports = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert len({r["hash"] for r in reports}) == 1
    assert len({r["file"] for r in reports}) == 1
    assert all(not r["warnings"] for r in reports), [r["warnings"] for r in reports]
    entries = _entries(cache)
    assert len(entries) == 1 and entries[0] == Path(reports[0]["file"])
    _assert_sealed(cache)
    assert len(list(cache.glob("ir_*.pickle"))) == 1, "one cached IR for the one spec file"
    assert not list(cache.glob(".*.tmp")), "no temporary file is left behind"


# --- killed writers -------------------------------------------------------------------------

STOP_CHILD = """
    import os, time
    from pathlib import Path
    import sys
    import ssmc
    from ssmc.pipeline import parse
    L = sys.modules["ssmc.load"]  # the attribute ssmc.load is the function
    flag = Path({flag!r})

    def stop(*args, **kwargs):
        flag.write_text(str(os.getpid()))
        time.sleep(600)

    {patch}
    ssmc.load(parse({spec!r}))
"""
STOPS = {
    # The temporary file is complete and fsynced; the rename into place has not happened.
    "before-rename": "L.os.replace = stop",
    # Half of the entry is written to the temporary file.
    "mid-write": (
        "real_fdopen = L.os.fdopen\n"
        "    class Half:\n"
        "        def __init__(self, f): self.f = f\n"
        "        def __enter__(self): return self\n"
        "        def __exit__(self, *a): self.f.close()\n"
        "        def write(self, data):\n"
        "            self.f.write(data[: len(data) // 2]); self.f.flush(); stop()\n"
        "        def __getattr__(self, name): return getattr(self.f, name)\n"
        "    L.os.fdopen = lambda fd, mode: Half(real_fdopen(fd, mode))"
    ),
    # The entry's lock is held; nothing is written yet.
    "holding-lock": "L.render.render_module = stop",
}


@pytest.mark.parametrize("moment", sorted(STOPS))
def test_writer_killed_mid_write_leaves_nothing_trusted(
    moment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, flag = tmp_path / "cache", tmp_path / "stopped"
    code = STOP_CHILD.format(flag=str(flag), patch=STOPS[moment], spec=SPEC)
    child = _spawn(code, cache)
    _wait_for(flag, child)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not _entries(cache), "a killed writer left an entry in place"
    # A later load neither trusts a partial file nor waits on the dead writer's lock.
    started = time.monotonic()
    op, warned = _fresh_load(cache, monkeypatch)
    assert time.monotonic() - started < 60
    assert not warned, warned
    (entry,) = _entries(cache)
    _assert_sealed(cache)
    assert op.module.__file__ == str(entry)  # type: ignore[attr-defined]


def test_writers_killed_at_random_leave_only_sealed_entries(tmp_path: Path) -> None:
    """A stream of loads of ever new specs, SIGKILLed at random moments, twice."""
    cache, ready = tmp_path / "cache", tmp_path / "ready"
    rng = random.Random(7)
    for round_ in range(2):
        code = f"""
            from pathlib import Path
            import ssmc
            from ssmc.pipeline import parse
            Path({str(ready)!r}).write_text("")
            for n in range(1, 10_000):
                ssmc.load(parse({SPEC!r}.replace("P = 4", f"P = {{n + {1000 * round_}}}")))
        """
        ready.unlink(missing_ok=True)
        child = _spawn(code, cache)
        _wait_for(ready, child)
        time.sleep(rng.uniform(0.3, 1.5))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert len(_entries(cache)) >= 1, "the writers wrote nothing before they were killed"
    _assert_sealed(cache)
    for code_file in cache.glob("*.py.code"):
        assert code_file.read_bytes()[:4] == importlib.util.MAGIC_NUMBER


# --- damaged files --------------------------------------------------------------------------

DAMAGE = {
    "truncated": lambda good: good[: len(good) // 3],
    "truncated-at-the-seal": lambda good: good[
        : good.rindex(L.TRAILER.encode()) + len(L.TRAILER) + 10
    ],
    "garbage": lambda good: b"\xff\xfe\x00garbage\n" * 200,
    "empty": lambda good: b"",
    "one-byte-flipped": lambda good: good.replace(b"import triton", b"import trit0n", 1),
    "forged-code-with-old-seal": lambda good: good.replace(
        b"import math", b"import math; raise SystemExit('forged')", 1
    ),
    "seal-only": lambda good: good[good.rindex(L.TRAILER.encode()) :],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_entry_is_rebuilt_and_reported_once(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    _fresh_load(cache, monkeypatch)
    (entry,) = _entries(cache)
    good = entry.read_bytes()
    entry.write_bytes(DAMAGE[damage](good))
    op, warned = _fresh_load(cache, monkeypatch)
    assert len(warned) == 1 and "damaged" in warned[0] and str(entry) in warned[0], warned
    assert entry.read_bytes() == good
    assert callable(op.module.forward)  # type: ignore[attr-defined]
    _, again = _fresh_load(cache, monkeypatch)
    assert again == [], "the rebuilt entry is reported again"


@pytest.mark.parametrize(
    "damage", ["garbage", "truncated", "other-source", "not-code"], ids=lambda d: d
)
def test_damaged_compiled_code_is_recompiled(
    damage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`<entry>.code` (magic, sha256 of the source, marshalled code) is checked, not trusted."""
    import marshal

    cache = tmp_path / "cache"
    _fresh_load(cache, monkeypatch)
    (code_file,) = cache.glob("*.py.code")
    good = code_file.read_bytes()
    header = good[: len(importlib.util.MAGIC_NUMBER) + 32]
    code_file.write_bytes(
        {
            "garbage": b"\x00garbage" * 50,
            "truncated": good[: len(good) // 2],
            "other-source": importlib.util.MAGIC_NUMBER + b"\x00" * 32 + good[len(header) :],
            "not-code": header + marshal.dumps(("not", "code")),
        }[damage]
    )
    op, warned = _fresh_load(cache, monkeypatch)
    assert callable(op.module.forward)  # type: ignore[attr-defined]
    assert not warned
    assert code_file.read_bytes() == good, "the compiled code is rewritten whole"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong-type"])
def test_damaged_ir_cache_is_reparsed(damage: str, tmp_path: Path) -> None:
    """The IR of a spec file, cached as `ir_*.pickle` with a sha256 trailer, is rebuilt."""
    import hashlib
    import pickle

    cache, spec_file = tmp_path / "cache", tmp_path / "probe.ssm"
    spec_file.write_text(SPEC)
    first = L.as_checked(spec_file, cache_dir=cache)
    (ir_file,) = cache.glob("ir_*.pickle")
    good = ir_file.read_bytes()
    body = pickle.dumps("a string, not a CheckedSpec")
    ir_file.write_bytes(
        {
            "garbage": b"\x80\x05garbage" * 30,
            "truncated": good[: len(good) // 2],
            "wrong-type": body + hashlib.sha256(body).hexdigest().encode(),
        }[damage]
    )
    assert L.as_checked(spec_file, cache_dir=cache) == first
    assert ir_file.read_bytes() == good


def test_an_entry_that_is_a_folder_is_a_cache_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something that cannot be replaced by a file: a clean CacheError, not a traceback."""
    cache = tmp_path / "cache"
    _fresh_load(cache, monkeypatch)
    (entry,) = _entries(cache)
    for sibling in cache.glob(entry.name + "*"):
        if sibling != entry:
            sibling.unlink()
    entry.unlink()
    entry.mkdir()
    (entry / "inside").write_text("x")
    monkeypatch.setattr(L, "_MODULES", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(L.CacheError):
            ssmc.load(parse(SPEC), cache_dir=cache)
