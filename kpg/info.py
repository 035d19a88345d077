"""What this kpg installation was built with and what it runs on: ``python -m kpg.info``.

Paste its output into bug reports. The build comes from ``kpg._C.build_info()``; the kernels' CPU
thread count follows ``torch.get_num_threads()`` at every op call (kpg._ops).
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from kpg import _C


def collect() -> dict[str, str]:
    """The report as (field, value) pairs, in printing order."""
    build = _C.build_info()
    cuda_available = torch.cuda.is_available()
    return {
        "kpg version": importlib.metadata.version("kpg"),
        "torch version": torch.__version__,
        "python": platform.python_version(),
        "CUDA kernels built": "yes" if build["cuda"] else "no (CPU kernels only)",
        "CUDA version built with": build["cuda_version"],
        "CUDA architectures built for": build["cuda_architectures"],
        "C++ compiler": build["cxx_compiler"],
        "CPU threads (torch)": str(torch.get_num_threads()),
        "CPU threads (kpg kernels)": str(_C.get_num_threads()),
        "torch sees a CUDA device": (
            f"yes ({torch.cuda.device_count()}: {torch.cuda.get_device_name(0)}; torch built with CUDA "
            f"{torch.version.cuda})"
            if cuda_available
            else f"no (torch built with CUDA {torch.version.cuda})" if torch.version.cuda else "no (CPU-only torch)"
        ),
    }


def main() -> None:
    report = collect()
    width = max(len(field) for field in report)
    for field, value in report.items():
        print(f"{field + ':':<{width + 1}} {value}")


if __name__ == "__main__":
    main()
