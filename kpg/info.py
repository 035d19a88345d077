"""What this kpg installation was built with and what it runs on: ``python -m kpg.info``.

Paste its output into bug reports. The build comes from ``kpg._C.build_info()``; the kernels' CPU
thread count follows ``torch.get_num_threads()`` at every op call (kpg._ops).
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from kpg import _C


def cuda_readiness() -> tuple[str, str]:
    """(the driver's CUDA version, whether kpg's CUDA kernels can run here and, if not, what they need).

    kpg links the CUDA runtime it was built with statically (docs/cuda.md), so the NVIDIA driver must
    support that CUDA major version; asking the driver needs no GPU.
    """
    versions = _C.cuda_versions()
    if versions["runtime"] is None:
        return (
            "not asked (no CUDA kernels)",
            "no (this build has no CUDA kernels: reinstall kpg where nvcc is available)",
        )
    driver = "none found" if versions["driver"] == 0 else f"supports CUDA {_version(versions['driver'])}"
    problem = _C.cuda_driver_problem(versions["driver"], versions["runtime"])
    if problem:
        return driver, f"no: {problem}"
    torch_major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    built_major = str(versions["runtime"] // 1000)
    if torch_major is not None and torch_major != built_major:
        return driver, (
            f"yes on this driver, but kpg's CUDA {built_major}.x needs a newer driver than torch's CUDA "
            f"{torch.version.cuda} on other machines; rebuild with a CUDA {torch_major}.x nvcc (docs/cuda.md)"
        )
    return driver, "yes" if torch.cuda.is_available() else "yes, once a GPU is present (the driver suffices)"


def _version(code: int) -> str:
    return f"{code // 1000}.{code % 1000 // 10}"


def _installed_version(package: str) -> str:
    """The package's installed version without importing it (JAX's import is slow), or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, str]:
    """The report as (field, value) pairs, in printing order."""
    build = _C.build_info()
    cuda_available = torch.cuda.is_available()
    driver, readiness = cuda_readiness()
    return {
        "kpg version": importlib.metadata.version("kpg"),
        "torch version": torch.__version__,
        "python": platform.python_version(),
        "jaxmarl version (smax envs)": _installed_version("jaxmarl"),
        "CUDA kernels built": "yes" if build["cuda"] else "no (CPU kernels only)",
        "CUDA version built with": build["cuda_version"],
        "CUDA architectures built for": build["cuda_architectures"],
        "C++ compiler": build["cxx_compiler"],
        "CUDA driver": driver,
        "kpg's CUDA kernels can run": readiness,
        "CPU threads (torch)": str(torch.get_num_threads()),
        "CPU threads (kpg kernels)": str(_C.get_num_threads()),
        "torch sees a CUDA device": (
            f"yes ({torch.cuda.device_count()}: {torch.cuda.get_device_name(0)}; torch built with CUDA "
            f"{torch.version.cuda})"
            if cuda_available
            else f"no (torch built with CUDA {torch.version.cuda})"
            if torch.version.cuda
            else "no (CPU-only torch)"
        ),
    }


def main() -> None:
    report = collect()
    width = max(len(field) for field in report)
    for field, value in report.items():
        print(f"{field + ':':<{width + 1}} {value}")


if __name__ == "__main__":
    main()
