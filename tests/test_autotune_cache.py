"""The autotune cache: keys and shape buckets, damaged files, concurrent and killed writers."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import signal
import time
import warnings
from pathlib import Path

import pytest

from ssmc.autotune_cache import (
    FILE_NAME,
    Key,
    Winner,
    dumps,
    lookup,
    make_key,
    read_entries,
    record,
    store_path,
)
from ssmc.cost import Shape
from ssmc.pipeline import parse, with_dims

SPEC = """\
ssm probe
dim H = 4, G = 2, N = 8, P
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
varlen
"""
H100 = ("NVIDIA H100 80GB HBM3", "9.0")
PROCESSES = 16


def key(seqlen: int = 4096, batch: int = 1, num_seqs: int = 1, **kw: object) -> Key:
    checked = kw.pop("checked", None) or parse(SPEC)
    shape = Shape(batch=batch, seqlen=seqlen, dims={"P": 16}, num_seqs=num_seqs)
    options = {"dtype": "bfloat16", "varlen": num_seqs > 1, "device": H100, **kw}
    return make_key(checked, shape, **options)  # type: ignore[arg-type]


def winner(form: str = "chunked", time_s: float = 1e-3) -> Winner:
    return Winner(form=form, chunk_size=128, launch={"block_m": 32}, time_s=time_s)


def test_a_bucket_is_powers_of_two_of_tokens_and_sequences() -> None:
    assert key(4096).digest == key(3000).digest == key(2049).digest
    assert key(4096).digest != key(4097).digest
    assert key(1024, batch=4).digest == key(1000, batch=4).digest != key(4096).digest
    # Uneven cu_seqlens with the same totals share an entry; the sequence count is bucketed.
    assert key(1000, num_seqs=3).digest == key(1020, num_seqs=4).digest
    assert key(1000, num_seqs=3).digest != key(1000, num_seqs=5).digest
    assert key(1000, num_seqs=3).digest != key(1000).digest


def test_the_key_names_device_dtype_spec_and_versions() -> None:
    base = key()
    assert base.capability == "9.0" and base.tokens == 4096 and base.seqs == 1
    assert dict(base.versions).keys() == {"ssmc", "triton", "torch", "build"}
    assert base.dims == (("P", 16),)  # call-time dims only: bound ones are in the spec hash
    others = [
        key(device=("NVIDIA H200", "9.0")),
        key(device=(H100[0], "8.0")),
        key(dtype="float16"),
        key(checked=with_dims(parse(SPEC), {"N": 16})),
    ]
    assert len({base.digest, *(k.digest for k in others)}) == 1 + len(others)


def test_record_keeps_every_entry(tmp_path: Path) -> None:
    assert lookup(key(), tmp_path) is None
    record(key(4096), winner("chunked"), tmp_path)
    record(key(64), winner("quadratic"), tmp_path)
    assert lookup(key(4096), tmp_path) == winner("chunked")
    assert lookup(key(64), tmp_path) == winner("quadratic")
    record(key(64), winner("recurrent"), tmp_path)
    assert lookup(key(64), tmp_path) == winner("recurrent")
    assert len(read_entries(store_path(tmp_path))) == 2
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def _good(tmp_path: Path) -> bytes:
    record(key(), winner(), tmp_path)
    return (tmp_path / FILE_NAME).read_bytes()


def _reformat(good: bytes, edit: object) -> bytes:
    data = json.loads(good)
    edit(data)  # type: ignore[operator]
    return json.dumps(data).encode()


DAMAGE = {
    "truncated": lambda good: good[: len(good) // 2],
    "garbage": lambda good: b"\xff\xfe\x00garbage" * 50,
    "empty": lambda good: b"",
    "not-an-object": lambda good: b"[1, 2, 3]",
    "checksum-mismatch": lambda good: good.replace(b'"chunked"', b'"recurrent"', 1),
    "wrong-format": lambda good: _reformat(good, lambda d: d.update(format="other/9")),
    "bad-winner-resealed": lambda good: dumps(
        {
            k: {**v, "winner": {**v["winner"], "time_s": -1}}
            for k, v in json.loads(good)["entries"].items()
        }
    ).encode(),
    "launch-not-a-map-resealed": lambda good: dumps(
        {
            k: {**v, "winner": {**v["winner"], "launch": [1]}}
            for k, v in json.loads(good)["entries"].items()
        }
    ).encode(),
    "backward-not-a-map-resealed": lambda good: dumps(
        {
            k: {**v, "winner": {**v["winner"], "backward": {"block_t": [64]}}}
            for k, v in json.loads(good)["entries"].items()
        }
    ).encode(),
    "backward-time-negative-resealed": lambda good: dumps(
        {
            k: {**v, "winner": {**v["winner"], "backward_time_s": -2.0}}
            for k, v in json.loads(good)["entries"].items()
        }
    ).encode(),
}


def test_backward_options_round_trip_and_old_entries_read(tmp_path: Path) -> None:
    """A winner's backward options are stored beside the forward's; an entry written before
    the backward was tuned (no backward fields) reads as untuned."""
    tuned = dataclasses.replace(
        winner("chunked"),
        backward={"block_t": 128, "wdla_splits": 2},
        backward_time_s=2e-3,
        backward_default_time_s=3e-3,
        backward_error=4e-3,
    )
    record(key(), tuned, tmp_path)
    assert lookup(key(), tmp_path) == tuned
    entries = read_entries(store_path(tmp_path))
    for entry in entries.values():
        for name in ("backward", "backward_time_s", "backward_default_time_s", "backward_error"):
            del entry["winner"][name]
    (tmp_path / FILE_NAME).write_text(dumps(entries))
    old = lookup(key(), tmp_path)
    assert old is not None and old.form == "chunked"
    assert dict(old.backward) == {} and old.backward_time_s is None


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_file_is_ignored_reported_once_and_rebuilt(damage: str, tmp_path: Path) -> None:
    path = tmp_path / FILE_NAME
    path.write_bytes(DAMAGE[damage](_good(tmp_path)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lookup(key(), tmp_path) is None
        assert lookup(key(), tmp_path) is None
        record(key(64), winner("quadratic"), tmp_path)
    messages = [str(w.message) for w in caught if "autotune cache" in str(w.message)]
    assert len(messages) == 1 and "damaged" in messages[0] and str(path) in messages[0]
    assert lookup(key(64), tmp_path) == winner("quadratic")
    assert read_entries(path).keys() == {key(64).digest}


def _record_one(folder: str, index: int, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    record(key(2 ** (index + 1)), winner(time_s=float(index + 1)), folder)


def test_sixteen_processes_record_at_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=_record_one, args=(str(tmp_path), i, start)) for i in range(16)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = read_entries(tmp_path / FILE_NAME)
    assert len(entries) == PROCESSES
    for i in range(PROCESSES):
        assert lookup(key(2 ** (i + 1)), tmp_path) == winner(time_s=float(i + 1))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _stuck_writer(folder: str, flag: str) -> None:
    real = os.replace

    def stop(src: str, dst: str) -> None:
        Path(flag).write_text("")
        time.sleep(600)  # killed here: the temporary file is written, the lock held
        real(src, dst)

    os.replace = stop  # this forked child only
    record(key(), winner("recurrent"), folder)


def test_a_writer_killed_mid_write_leaves_nothing_trusted(tmp_path: Path) -> None:
    record(key(64), winner("quadratic"), tmp_path)
    before = (tmp_path / FILE_NAME).read_bytes()
    flag = tmp_path / "stopped"
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_stuck_writer, args=(str(tmp_path), str(flag)))
    child.start()
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert child.is_alive() and time.monotonic() < deadline, "the writer never stopped"
        time.sleep(0.01)
    os.kill(child.pid or 0, signal.SIGKILL)
    child.join(30)
    assert (tmp_path / FILE_NAME).read_bytes() == before  # the half-written entry is not in
    started = time.monotonic()
    record(key(4096), winner("chunked"), tmp_path)  # the dead writer's lock is not waited on
    assert time.monotonic() - started < 30
    assert lookup(key(64), tmp_path) == winner("quadratic")
    assert lookup(key(4096), tmp_path) == winner("chunked")
