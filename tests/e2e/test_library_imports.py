"""The library never imports `trl` (issue #17): the TRL comparison lives in benchmarks/trlbench/."""

from __future__ import annotations

import os
import subprocess
import sys

_CHECK = """
import importlib, pkgutil, sys
import posttrain
names = [m.name for m in pkgutil.walk_packages(posttrain.__path__, "posttrain.") if m.name != "posttrain.__main__"]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m == "trl" or m.startswith("trl.") or m.startswith("trlbench"))
print(len(names), leaked)
"""


def test_importing_every_library_module_never_imports_trl():
    # A fresh interpreter: this test process may have imported trl through benchmarks' tests.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, leaked = proc.stdout.strip().split(" ", 1)
    assert int(count) > 50  # every module of the package was imported, not an empty walk
    assert leaked == "[]"


def test_no_library_source_imports_trl():
    """Lazy imports inside functions count too: the import test above only sees module level."""
    import ast
    from pathlib import Path

    import posttrain

    offenders = []
    for path in Path(posttrain.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [
                f"{path.name}:{node.lineno}" for n in names if n.split(".")[0] in ("trl", "trlbench")
            ]
    assert offenders == []
