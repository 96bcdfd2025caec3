"""The e2e suite's checkout copies link the wheelhouse where they can and copy it where they cannot."""

import os
import tempfile
from pathlib import Path

import pytest

from tests.e2e.releases import link_or_copy

SHM = Path("/dev/shm")


def test_on_one_file_system_the_wheel_is_a_hard_link(tmp_path):
    source = tmp_path / "a.whl"
    source.write_bytes(b"wheel")
    link_or_copy(str(source), str(tmp_path / "b.whl"))
    assert (tmp_path / "b.whl").read_bytes() == b"wheel"
    assert source.stat().st_nlink == 2


@pytest.mark.skipif(not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tempfile.gettempdir()).st_dev,
                    reason="needs /dev/shm on a file system apart from the temporary directory (Debian mounts it "
                           "as a tmpfs of its own)")
def test_across_file_systems_the_wheel_is_copied(tmp_path):
    source = tmp_path / "a.whl"
    source.write_bytes(b"wheel")
    destination = SHM / f"ingest-test-{os.getpid()}.whl"
    try:
        link_or_copy(str(source), str(destination))
        assert destination.read_bytes() == b"wheel"
        assert source.stat().st_nlink == 1, "a link across file systems cannot exist: it must be a copy"
    finally:
        destination.unlink(missing_ok=True)
