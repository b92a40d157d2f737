"""examples/mqar.py: the MQAR data (every query's answer is its key's value), the dims each
spec is rebound to, and a --tiny run on CPU that ends with the results table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ssmc.pipeline import parse_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "mqar.py"


@pytest.fixture(scope="module")
def mqar() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mqar_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("seqlen", "pairs", "vocab"), [(32, 4, 64), (256, 64, 8192), (20, 5, 16)])
def test_queries_answer_with_their_keys_values(
    mqar: ModuleType, seqlen: int, pairs: int, vocab: int
) -> None:
    g = torch.Generator().manual_seed(seqlen)
    tokens, labels = mqar.mqar_batch(16, seqlen, pairs, vocab, generator=g)
    assert tokens.shape == labels.shape == (16, seqlen)
    assert ((tokens >= 0) & (tokens < vocab)).all()
    context = 2 * pairs
    for row, lab in zip(tokens.tolist(), labels.tolist(), strict=True):
        keys, values = row[0:context:2], row[1:context:2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        assert all(1 <= k < vocab // 2 for k in keys)
        assert all(vocab // 2 <= v < vocab for v in values)
        answer = dict(zip(keys, values, strict=True))
        asked = [t for t, y in enumerate(lab) if y != mqar.IGNORE]
        assert len(asked) == pairs
        assert all(t >= context and (t - context) % 2 == 0 for t in asked)
        assert sorted(row[t] for t in asked) == sorted(keys)  # each key asked once
        assert all(lab[t] == answer[row[t]] for t in asked)


def test_gaps_follow_a_power_law(mqar: ModuleType) -> None:
    g = torch.Generator().manual_seed(0)
    _, labels = mqar.mqar_batch(512, 64, 4, 64, generator=g)
    first = (labels[:, 8] != mqar.IGNORE).float().mean()
    last = (labels[:, 62] != mqar.IGNORE).float().mean()
    assert first > 0.5 and last < first / 4


def test_too_many_pairs_is_refused(mqar: ModuleType) -> None:
    with pytest.raises(ValueError, match="pairs need"):
        mqar.mqar_batch(2, 32, 9, 64)


def test_dims_are_rebound_to_the_model_width(mqar: ModuleType) -> None:
    mamba2 = parse_file(ROOT / "examples" / "mamba2.ssm")
    assert mqar.mixer_dims(mamba2, 128, 2, 32, 64) == {"H": 8, "G": 1, "N": 64, "P": 32}
    mqa = parse_file(ROOT / "examples" / "mqa.ssm")
    assert mqar.mixer_dims(mqa, 128, 2, 64, 32) == {"H": 4, "G": 2, "N": 32, "P": 64}
    mamba1 = parse_file(ROOT / "examples" / "mamba1.ssm")
    assert mqar.mixer_dims(mamba1, 64, 2, 32, 16) == {"H": 128, "N": 16}


def test_curriculum_is_zoologys_mixture(mqar: ModuleType) -> None:
    levels = mqar.curriculum(mqar.arguments(["--batch", "256"]))
    settings = [(lv.seqlen, lv.pairs) for lv in levels]
    assert settings == [(64, 4), (128, 8), (256, 16), (256, 32), (256, 64)]
    assert [lv.batch * lv.seqlen for lv in levels] == [256 * 256] * 5  # tokens per step
    assert [lv.weight for lv in levels] == [5, 1, 1, 1, 1]
    only = mqar.curriculum(mqar.arguments(["--curriculum", "none"]))
    assert [(lv.seqlen, lv.pairs) for lv in only] == [(256, 64)]
    sample = mqar.Sampler(mqar.arguments(["--tiny"]), 0, torch.device("cpu"))
    shapes = {sample(1.0)[0].shape for _ in range(40)}
    assert shapes == {(8, 32)}


def test_tiny_run_prints_the_table_last(tmp_path: Path) -> None:
    out = tmp_path / "mqar.json"
    # The PyTorch reference path (no interpreter): a smoke run of the script, kept fast.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "examples/mamba2.ssm:H=2", "--tiny", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.rstrip("\n").splitlines()
    header, rule, *rows = lines[-4:]
    assert header.split()[:4] == ["spec", "dims", "params", "accuracy"]
    assert set(rule) <= {"-", " "}
    assert [r.split()[0] for r in rows] == ["mamba2:H=2", "attention"]
    results = json.loads(out.read_text())["results"]
    assert [r["spec"] for r in results] == ["mamba2:H=2", "attention"]
    assert all(r["steps"] == 4 and 0 <= r["accuracy"] <= 1 for r in results)
    assert all(len(r["history"]) == 2 for r in results)
    assert "H=2" in results[0]["detail"]
