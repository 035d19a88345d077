"""The optional parts of kpg and what they need beyond the core install (torch, numpy).

``import kpg`` and :class:`kpg.KPGOptimizer` need only the core; the trainers and the ``kpg``
command need the ``train`` extra. :func:`require_extra` turns a missing module into an error that
names the extra to install, before any work starts.
"""

from __future__ import annotations

import importlib.util

# extra -> the modules it provides (import names of pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("pettingzoo", "mpe2", "tyro", "tqdm", "matplotlib", "tensorboard"),
}


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; kpg's extras with modules to check: {', '.join(EXTRAS)}")
    return [name for name in EXTRAS[extra] if not _importable(name)]


def require_extra(extra: str, what: str) -> None:
    """Raises SystemExit naming ``what`` needs and the pip command that installs it, if any module of
    ``extra`` is missing."""
    missing = missing_modules(extra)
    if missing:
        raise SystemExit(
            f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed; "
            f"install kpg's {extra!r} extra: pip install 'kpg[{extra}]' (from a checkout: pip install -e '.[{extra}]')"
        )


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package fails to import, or sys.modules[name] is None
        return False
