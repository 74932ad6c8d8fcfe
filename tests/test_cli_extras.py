"""A command run without the extra it needs says which extra to install, not a ModuleNotFoundError traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Poisoning sys.modules makes `import <module>` raise ModuleNotFoundError, as on an install without the extra.
SCRIPT = """
import sys
sys.modules[{module!r}] = None
from fleetscope.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize(("module", "argv", "extra"), [
    ("psutil", ["agent", "--collector-url", "http://127.0.0.1:9"], "agent"),
    ("polars", ["collector", "--data-dir", "{tmp}"], "collector"),
])
def test_a_missing_extra_is_named_with_the_command_to_install_it(tmp_path, module, argv, extra):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(module=module, argv=argv)], capture_output=True, text=True,
                         timeout=60, env={"PATH": "/usr/bin:/bin", "FLEETSCOPE_INGEST_TOKEN": "t", "FLEETSCOPE_READ_TOKEN": "r",
                                          "HOME": str(tmp_path)})
    assert out.returncode == 2, out.stderr
    assert f"pip install 'fleetscope[{extra}]'" in out.stderr and repr(module) in out.stderr
    assert "Traceback" not in out.stderr


def test_a_missing_module_that_is_not_an_extras_is_still_a_traceback(tmp_path):
    # a bug (a module of our own missing) must not be dressed up as an install problem
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(module="agent.main", argv=["agent", "--collector-url",
                                                                                          "http://127.0.0.1:9"])],
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                                          "FLEETSCOPE_INGEST_TOKEN": "t"})
    assert out.returncode != 0 and "Traceback" in out.stderr and "pip install" not in out.stderr
