"""Test session setup: 8 simulated CPU devices, float32, and the shared reference fixtures."""

import os

# Must happen before JAX is imported anywhere: sharding tests need 8 simulated CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def fixtures_dir():
    """`../shared/fixtures` next to the repository (CI clones it beside shared/)."""
    for candidate in (os.environ.get("LDM_JAX_FIXTURES", ""),
                      os.path.join(REPO, "..", "shared", "fixtures")):
        if candidate and os.path.isdir(candidate):
            return os.path.abspath(candidate)
    pytest.fail("reference fixtures not found: put shared/fixtures beside the repository or set "
                "LDM_JAX_FIXTURES")
