"""setup.py installs every subpackage of the library (a wheel, unlike the editable install, holds only those)."""
import runpy
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parent.parent


def test_setup_lists_every_package(monkeypatch):
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "coconut_engine").rglob("__init__.py")}
    assert on_disk <= set(captured["packages"])
    assert "coconut_engine.kernels" in captured["packages"]
    assert captured["package_dir"]["coconut_engine.kernels"] == "kernels"
