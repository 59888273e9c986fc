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


@pytest.fixture
def malicious_checkpoint(tmp_path):
    """`make(file_name, module, name) -> (path, payload, marker)`: a `torch.save`-style zip whose
    pickle calls `module.name` on a command that would create `marker` (a shell `touch`, or for
    `eval` a Python `open`), so a test can check that loading refuses it and runs nothing."""
    import zipfile

    marker = tmp_path / "pwned"

    def make(file_name, module, name):
        command = f"open({str(marker)!r}, 'w').close()" if name == "eval" else f"touch {marker}"
        payload = (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X"
                   + len(command).to_bytes(4, "little") + command.encode() + b"\x85R.")
        path = tmp_path / file_name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", payload)
            z.writestr("archive/byteorder", "little")
        return path, payload, marker

    return make
