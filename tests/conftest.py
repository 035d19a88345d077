import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
# Random (not derandomized) examples, so successive nightly runs explore new inputs; a failure
# prints the blob that reproduces it (@reproduce_failure).
settings.register_profile("nightly", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("KPG_HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--nightly", action="store_true",
                     help="run the property tests with the nightly hypothesis profile (2000 examples each)")


def pytest_configure(config):
    if config.getoption("--nightly"):
        settings.load_profile("nightly")


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


# Relative tolerance of kernel-vs-reference comparisons. The kernels and torch round the same
# operations in the same order; they differ only where one side fuses a multiply-add, about one
# unit in the last place of a term, so errors are measured against the tensor's scale.
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = ""):
    """|actual - expected| <= rtol * (|expected| + max|expected|) elementwise; NaN must match NaN."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_actual, nan_expected = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_actual, nan_expected), f"{what}: NaN positions differ"
    finite = torch.isfinite(expected) & ~nan_actual
    assert torch.equal(actual[~finite & ~nan_actual], expected[~finite & ~nan_expected]), f"{what}: inf differ"
    a, e = actual[finite].double(), expected[finite].double()
    if e.numel() == 0:
        return
    scale = e.abs().max()
    error = (a - e).abs()
    bound = rtol * (e.abs() + scale)
    worst = (error / bound.clamp_min(torch.finfo(torch.float64).tiny)).max().item()
    assert bool((error <= bound).all()), f"{what}: error {error.max().item():.3e} exceeds rtol {rtol} ({worst:.2f}x)"


def assert_as_accurate_as(actual, baseline, truth, rtol: float, what: str = ""):
    """Low-precision ``actual`` is no further from the float64 ``truth`` than twice the low-precision
    ``baseline`` (the reference, or torch.optim) is, plus rtol of the tensor's scale.

    Both sides round the same operations; ill-conditioned elements (centered RMSprop's variance near
    zero) amplify one rounding difference far past any fixed tolerance, for torch as for us.
    """
    nan_actual, nan_truth = torch.isnan(actual), torch.isnan(truth)
    assert torch.equal(nan_actual, nan_truth), f"{what}: NaN positions differ"
    finite = torch.isfinite(truth)
    assert torch.equal(actual[~finite & ~nan_truth].double(), truth[~finite & ~nan_truth]), f"{what}: inf differ"
    a, b, t = actual[finite].double(), baseline[finite].double(), truth[finite]
    if t.numel() == 0:
        return
    baseline_error = (b - t).abs().max()
    error = (a - t).abs()
    bound = rtol * (t.abs() + t.abs().max()) + 2 * baseline_error
    assert bool((error <= bound).all()), (
        f"{what}: error {error.max().item():.3e} against float64 exceeds rtol {rtol} of scale plus twice the "
        f"baseline's error {baseline_error.item():.3e}"
    )


def rows(kind: str, hyper: dict, num_agents) -> dict[str, torch.Tensor]:
    """The ``hyper`` argument of a kpg update op: ``hyper`` (a dict of one family's
    hyperparameters) as every agent's row; ``num_agents`` an int or the op's step tensor."""
    from kpg import _ops as ops

    count = num_agents if isinstance(num_agents, int) else num_agents.numel()
    return {"hyper": ops.hyper_rows(kind, hyper, count)}


def no_live(num_agents: int) -> torch.Tensor:
    """A ``live`` table in which no state tensor holds values yet."""
    from kpg import _ops as ops

    return torch.zeros(num_agents, ops.MAX_STATES, dtype=torch.uint8)
