"""pytest plugin (``-p sanitized_extension``) that makes ``import kpg`` use the extension named by
``KPG_SANITIZED_EXTENSION`` (built by scripts/sanitize.sh with AddressSanitizer and
UndefinedBehaviorSanitizer) instead of the installed one, without touching the installation.

The editable install resolves ``kpg._C`` through its own import hook, ahead of PYTHONPATH, so the
sanitized module is loaded by path and registered under ``kpg._C`` before anything imports kpg.
"""

import importlib.util
import os
import sys

_path = os.environ["KPG_SANITIZED_EXTENSION"]
_spec = importlib.util.spec_from_file_location("kpg._C", _path)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
sys.modules["kpg._C"] = _module


def pytest_report_header(config):
    with open("/proc/self/maps") as maps:
        runtimes = sorted(
            {line.split()[-1].rsplit("/", 1)[-1] for line in maps if "libasan" in line or "libubsan" in line}
        )
    return f"kpg._C: {_module.__file__} (sanitizer runtimes loaded: {', '.join(runtimes) or 'none'})"
