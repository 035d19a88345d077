"""``python -m kpg.info`` runs and reports every field a bug report needs."""

import importlib.metadata
import subprocess
import sys

import torch

from kpg import _C


def test_info_reports_versions_build_and_devices():
    result = subprocess.run([sys.executable, "-m", "kpg.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    fields = {field.strip(): value.strip() for field, value in fields.items()}
    build = _C.build_info()
    assert fields["kpg version"] == importlib.metadata.version("kpg")
    assert fields["torch version"] == torch.__version__
    try:  # SMAX changed between JaxMARL releases: a report names the one installed
        jaxmarl = importlib.metadata.version("jaxmarl")
    except importlib.metadata.PackageNotFoundError:
        jaxmarl = "not installed"
    assert fields["jaxmarl version (smax envs)"] == jaxmarl
    assert fields["CUDA kernels built"].startswith("yes" if build["cuda"] else "no")
    assert fields["CUDA version built with"] == build["cuda_version"]
    assert fields["CUDA architectures built for"] == build["cuda_architectures"]
    assert fields["C++ compiler"] == build["cxx_compiler"]
    assert int(fields["CPU threads (torch)"]) >= 1 and int(fields["CPU threads (kpg kernels)"]) >= 1
    assert fields["torch sees a CUDA device"].startswith("yes" if torch.cuda.is_available() else "no")
