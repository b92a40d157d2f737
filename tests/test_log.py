"""ssmc.log: `$SSMC_LOG` sets the `ssmc` logger's level; loads and plans say what they did."""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ssmc import log
from ssmc.cost import Shape
from ssmc.pipeline import parse_file
from ssmc.plan import plan

ROOT = Path(__file__).parent.parent
SPEC = ROOT / "examples" / "retnet.ssm"


@pytest.fixture
def ssmc_logger() -> Iterator[logging.Logger]:
    """The `ssmc` logger, restored (level, handlers, propagation) after the test."""
    logger = logging.getLogger("ssmc")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


@pytest.mark.parametrize(
    ("text", "level"),
    [("info", logging.INFO), ("DEBUG", logging.DEBUG), (" warning ", logging.WARNING),
     ("10", 10), (None, logging.WARNING), ("", logging.WARNING)],
)
def test_parse_level(text: str | None, level: int) -> None:
    assert log.parse_level(text) == level


def test_parse_level_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        log.parse_level("loud")


def test_default_is_warning_without_a_handler(
    ssmc_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(log.ENV, raising=False)
    ssmc_logger.handlers[:] = []
    log.configure()
    assert ssmc_logger.level == logging.WARNING
    assert ssmc_logger.handlers == [] and ssmc_logger.propagate


def test_env_sets_level_and_one_handler(
    ssmc_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(log.ENV, "info")
    ssmc_logger.handlers[:] = []
    log.configure()
    log.configure()
    assert ssmc_logger.level == logging.INFO
    assert len(ssmc_logger.handlers) == 1 and not ssmc_logger.propagate


def test_bad_env_falls_back_to_warning(
    ssmc_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(log.ENV, "chatty")
    log.configure()
    assert ssmc_logger.level == logging.WARNING
    assert "unknown log level 'chatty'" in capsys.readouterr().err


def test_planner_logs_its_choice(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="ssmc"):
        chosen = plan(parse_file(SPEC), Shape(batch=2, seqlen=4096))
    [record] = [r for r in caplog.records if r.name == "ssmc.plan"]
    assert f"{chosen.form.value}, chunk {chosen.chunk_size}" in record.getMessage()


def test_load_logs_cache_miss_then_hit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    load_module = importlib.import_module("ssmc.load")
    with caplog.at_level(logging.INFO, logger="ssmc"):
        checked = load_module.as_checked(SPEC, cache_dir=tmp_path)
        load_module.load(checked, cache_dir=tmp_path)
        load_module._MODULES.pop(load_module.cache_key(checked))
        load_module.load(checked, cache_dir=tmp_path)
    said = [r.getMessage() for r in caplog.records if r.name == "ssmc.load"]
    assert said[0].startswith("cache miss: rendering retnet into " + str(tmp_path))
    assert said[1].startswith("cache hit: retnet from " + str(tmp_path))
    # $SSMC_LOG alone makes a fresh process print such lines, in ssmc's format.
    code = f"import ssmc; ssmc.load({str(SPEC)!r}, cache_dir={str(tmp_path)!r})"
    for level, shown in (("info", True), (None, False)):
        env = {k: v for k, v in os.environ.items() if k != log.ENV}
        if level is not None:
            env[log.ENV] = level
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120, check=True)
        assert ("ssmc: INFO: ssmc.load: cache " in done.stderr) is shown
