import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from helpers import CUDA_SKIP_REASON

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
# Random (not derandomized) examples, so successive nightly runs explore new inputs; a failure
# prints the blob that reproduces it (@reproduce_failure).
settings.register_profile(
    "nightly",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("KPG_HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption(
        "--nightly",
        action="store_true",
        help="run the property tests with the nightly hypothesis profile (2000 examples each)",
    )


def pytest_configure(config):
    if config.getoption("--nightly"):
        settings.load_profile("nightly")


# Every device-parametrized test is collected for CUDA too, and skipped with the reason without one.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON))
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a test runs on: the CPU always, CUDA when kpg has CUDA kernels and torch a GPU."""
    return torch.device(request.param)


@pytest.fixture
def float64():
    """torch's default dtype is float64 for the test (trainers built inside it follow it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
