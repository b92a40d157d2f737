"""The wheel ships the grammar and templates: an installed copy parses and renders a spec."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_installed_wheel_parses_and_renders(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("ssmc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ssmc/grammar/ssm.lark" in names
    assert "ssmc/templates/module.py.jinja" in names
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    probe = (
        "import ssmc, ssmc.resources as r, ssmc.render as g;"
        f"c = ssmc.parse_file({str(ROOT / 'examples' / 'mamba2.ssm')!r});"
        "assert str(r.data_dir('grammar')).startswith(" + repr(str(site)) + ");"
        "print(len(g.render_module(c)) > 1000, c.pattern.value)"
    )
    # -I isolates from the source tree: the only ssmc importable is the installed copy.
    run = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {probe}"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "MVA"]
