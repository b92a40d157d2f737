"""The generated module's launcher (templates/fast_launch.py.jinja): a launch whose
specialisation key was seen goes to the compiled kernel's runner with every argument in
signature order; anything Triton could specialise differently (alignment, int classes,
constexprs, launch options) takes Triton's own path; a refusing runner turns the fast path off.

Triton's JIT needs a GPU, so these drive _FastKernel with a stand-in JIT function; the GPU
run of the kernel tests (scripts/gpu_check.sh tests) exercises it on real kernels."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from ssmc.load import load
from ssmc.pipeline import parse_file, with_dims

ROOT = Path(__file__).resolve().parent.parent


class Param:
    def __init__(self, name: str, default: Any = inspect.Parameter.empty) -> None:
        self.name, self.default = name, default


class Compiled:
    """A compiled kernel: `compiled[grid](*args)` records the launch."""

    def __init__(self, launches: list[tuple[Any, tuple[Any, ...]]], refuse: bool = False) -> None:
        self.launches, self.refuse = launches, refuse

    def __getitem__(self, grid: Any) -> Any:
        def runner(*args: Any) -> None:
            if self.refuse:
                raise TypeError("function takes exactly 12 arguments")
            self.launches.append((grid, args))

        return runner


class JitStandIn:
    """kernel(x_ptr, n, stride, BLOCK: constexpr, FLAG: constexpr = False)."""

    arg_names = ["x_ptr", "n", "stride", "BLOCK", "FLAG"]
    params = [Param("x_ptr"), Param("n"), Param("stride"), Param("BLOCK"), Param("FLAG", False)]
    constexprs = [3, 4]

    def __init__(self, refuse: bool = False) -> None:
        self.slow: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.fast: list[tuple[Any, tuple[Any, ...]]] = []
        self.refuse = refuse
        self.warmups: list[bool] = []

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Compiled:
        self.warmups.append(warmup)
        self.slow.append((args, kwargs))
        return Compiled(self.fast, self.refuse)


@pytest.fixture
def module(monkeypatch: pytest.MonkeyPatch) -> Any:
    op = load(with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"), {"H": 2, "N": 4, "P": 4}))
    monkeypatch.setattr(op.module, "_FAST_LAUNCH", [True])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return op.module


def test_a_seen_key_launches_the_compiled_kernel_with_every_argument(module: Any) -> None:
    fn = JitStandIn()
    kernel = module._FastKernel(fn)
    x = torch.zeros(64)
    kernel[(3,)](x, 32, 1, BLOCK=16, num_warps=4)
    assert len(fn.slow) == 1 and not fn.fast
    y = torch.ones(32)  # another aligned fp32 tensor: same key
    kernel[(5, 2)](y, 32, 1, BLOCK=16, num_warps=4)
    assert len(fn.slow) == 1
    assert fn.fast == [((5, 2, 1), (y, 32, 1, 16, False))]  # default filled, no options


@pytest.mark.parametrize(
    "change",
    [
        lambda x: ((x[1:], 32, 1), {"BLOCK": 16, "num_warps": 4}),  # 4-byte offset: unaligned
        lambda x: ((x, 33, 1), {"BLOCK": 16, "num_warps": 4}),  # not % 16
        lambda x: ((x, 48, 1), {"BLOCK": 16, "num_warps": 4}),  # ints are keyed by value
        lambda x: ((x, 32, 2), {"BLOCK": 16, "num_warps": 4}),  # stride 1 → 2
        lambda x: ((x, 1 << 40, 1), {"BLOCK": 16, "num_warps": 4}),  # past int32
        lambda x: ((x.half(), 32, 1), {"BLOCK": 16, "num_warps": 4}),  # dtype
        lambda x: ((x, 32, 1), {"BLOCK": 32, "num_warps": 4}),  # constexpr
        lambda x: ((x, 32, 1), {"BLOCK": 16.5, "num_warps": 4}),  # a float constexpr
        lambda x: ((x, 32, 1), {"BLOCK": 16, "FLAG": True, "num_warps": 4}),  # defaulted one
        lambda x: ((x, 32, 1), {"BLOCK": 16, "num_warps": 8}),  # launch option
        lambda x: ((x, 32, True), {"BLOCK": 16, "num_warps": 4}),  # a bool, not the int 1
        lambda x: ((x, 32.0, 1), {"BLOCK": 16, "num_warps": 4}),  # a float, not an int
        lambda x: ((torch.nn.Parameter(x), 32, 1), {"BLOCK": 16, "num_warps": 4}),  # subclass
    ],
)
def test_anything_triton_specialises_on_takes_its_own_path(module: Any, change: Any) -> None:
    fn = JitStandIn()
    kernel = module._FastKernel(fn)
    x = torch.zeros(64)
    kernel[(1,)](x, 32, 1, BLOCK=16, num_warps=4)
    args, kwargs = change(x)
    kernel[(1,)](*args, **kwargs)
    assert len(fn.slow) == 2 and not fn.fast


def test_runtime_floats_are_keyed_by_type_only(module: Any) -> None:
    fn = JitStandIn()
    kernel = module._FastKernel(fn)
    x = torch.zeros(64)
    kernel[(1,)](x, 0.5, 1, BLOCK=16)
    kernel[(1,)](x, 0.25, 1, BLOCK=16)  # Triton does not specialise on a float's value
    assert len(fn.slow) == 1 and fn.fast == [((1, 1, 1), (x, 0.25, 1, 16, False))]


def test_float_constexprs_are_keyed_by_value(module: Any) -> None:
    """A float constexpr is compiled into the kernel (the intra's SPREAD_MAX): another value
    is another kernel, never the one compiled for the first value."""
    fn = JitStandIn()
    kernel = module._FastKernel(fn)
    x = torch.zeros(64)
    kernel[(1,)](x, 32, 1, BLOCK=60.0)
    kernel[(1,)](x, 32, 1, BLOCK=-1.0)
    assert len(fn.slow) == 2 and not fn.fast
    kernel[(1,)](x, 32, 1, BLOCK=60.0)
    assert len(fn.slow) == 2 and fn.fast == [((1, 1, 1), (x, 32, 1, 60.0, False))]


def test_the_keys_a_kernel_keeps_are_bounded(module: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "_MAX_KEYS", 8)
    fn = JitStandIn()
    kernel = module._FastKernel(fn)
    x = torch.zeros(64)
    for n in range(20):
        kernel[(1,)](x, n, 1, BLOCK=16)
    assert len(kernel._compiled) <= 8
    kernel[(1,)](x, 19, 1, BLOCK=16)
    assert len(fn.slow) == 20 and len(fn.fast) == 1


def test_a_refusing_runner_turns_the_fast_path_off(module: Any) -> None:
    fn = JitStandIn(refuse=True)
    kernel = module._FastKernel(fn)
    x = torch.zeros(64)
    kernel[(1,)](x, 32, 1, BLOCK=16)
    kernel[(1,)](x, 32, 1, BLOCK=16)  # refused by the runner: Triton's path runs it
    assert len(fn.slow) == 2 and module._FAST_LAUNCH == [False]
    kernel[(1,)](x, 32, 1, BLOCK=16)
    assert len(fn.slow) == 3 and not fn.fast


def test_warmup_and_a_switched_off_launcher_take_tritons_path(module: Any) -> None:
    fn = JitStandIn()
    kernel = module._FastKernel(fn)
    x = torch.zeros(64)
    kernel.warmup(x, 32, 1, BLOCK=16, grid=(1,))
    kernel.warmup(x, 32, 1, BLOCK=16, grid=(1,))
    assert len(fn.slow) == 2
    module._FAST_LAUNCH[0] = False
    kernel[(1,)](x, 32, 1, BLOCK=16)
    kernel[(1,)](x, 32, 1, BLOCK=16)
    assert len(fn.slow) == 4 and not fn.fast


def test_under_the_interpreter_no_kernel_is_wrapped(module: Any) -> None:
    """TRITON_INTERPRET=1 (as in CI): the kernels stay Triton's interpreted functions."""
    kernels = [v for k, v in vars(module).items() if k.endswith("_kernel")]
    assert kernels and not any(isinstance(k, module._FastKernel) for k in kernels)


def test_precompile_turns_launches_into_compilations(module: Any, monkeypatch) -> None:
    """Inside precompile every launch asks Triton for the compiled kernel only (warmup) and
    nothing reaches a runner; after it, launches run again."""
    pytest.importorskip("triton.runtime._async_compile")
    monkeypatch.setattr(module, "_PRECOMPILE", True)
    fn = JitStandIn()
    kernel = module._FastKernel(fn)
    x = torch.zeros(64)
    assert module.precompile(lambda: kernel[(3,)](x, 32, 1, BLOCK=16)) is True
    assert fn.warmups == [True] and not fn.fast
    kernel[(3,)](x, 32, 1, BLOCK=16)
    kernel[(3,)](x, 32, 1, BLOCK=16)
    assert fn.warmups == [True, False] and len(fn.fast) == 1


def test_precompile_is_off_under_the_interpreter(module: Any) -> None:
    fn = JitStandIn()
    kernel = module._FastKernel(fn)
    assert module.precompile(lambda: kernel[(3,)](torch.zeros(4), 4, 1, BLOCK=4)) is False
    assert fn.warmups == []


class _CudaLike:
    """What SsmcOp._precompile reads of a tensor."""

    is_cuda = True
    dtype = torch.bfloat16
    device = torch.device("cuda", 0)


def test_the_first_call_of_each_kind_is_precompiled_once(monkeypatch) -> None:
    op = load(with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"), {"H": 2, "N": 4, "P": 4}))
    monkeypatch.setattr(op, "interpreted", False)
    calls: list[str] = []
    monkeypatch.setattr(op.module, "precompile", lambda call: calls.append(call()))
    tensors = [_CudaLike()]
    for kind in (("forward", "chunked", 64, None), ("forward", "chunked", 64, None),
                 ("forward", "chunked", 128, None), ("backward", "chunked", 64)):
        op._precompile(kind, tensors, None, None, lambda kind=kind: kind[0])
    assert calls == ["forward", "forward", "backward"]
    op._precompile(("forward", "chunked", 64, {"num_warps": [4]}), tensors, None, None,
                   lambda: "unhashable")
    assert calls == ["forward", "forward", "backward"]


def test_no_precompile_while_a_cuda_graph_is_captured(monkeypatch) -> None:
    """During capture the compile-only run's torch work would join the graph: skipped."""
    op = load(with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"), {"H": 2, "N": 4, "P": 4}))
    monkeypatch.setattr(op, "interpreted", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    calls: list[str] = []
    monkeypatch.setattr(op.module, "precompile", lambda call: calls.append(call()))
    op._precompile(("forward", "chunked", 64, None), [_CudaLike()], None, None, lambda: "ran")
    assert calls == []
