"""The state disk's rates: the shipped profile, the --probe-disk probe, and chunkft-plan's flags."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from chunkft.planner.cli import main
from chunkft.profiles import ProfileError
from chunkft.profiles.disk import load_disk, probe, with_rates

BASE = ["tiny-llama", "--gpu", "cpu", "--seq-len", "64", "--batch-size", "1", "--host-mem", "4GiB"]


def test_shipped_default_is_a_conservative_sourced_nvme() -> None:
    d = load_disk()
    # under a PCIe 4.0 NVMe's burst (7 GB/s read, 5 GB/s write), above a SATA SSD's ~0.55 GB/s
    assert 1_000_000_000 <= d.read_bytes_per_s < 7_000_000_000
    assert 500_000_000 <= d.write_bytes_per_s < d.read_bytes_per_s
    assert all("data sheet" in d.sources[f] for f in ("read_bytes_per_s", "write_bytes_per_s"))


def test_probe_measures_a_real_file_and_leaves_nothing(tmp_path: Path) -> None:
    read, write = probe(str(tmp_path), 32 * 2**20)
    assert read > 10_000_000 and write > 10_000_000  # any disk or tmpfs does 10 MB/s
    assert list(tmp_path.iterdir()) == []


def test_probe_of_a_missing_directory_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not a directory"):
        probe(str(tmp_path / "nope"))


def test_overrides_replace_one_figure_and_its_source() -> None:
    d = with_rates(load_disk(), 2_000_000_000, None, "--disk-read")
    assert d.read_bytes_per_s == 2_000_000_000 and d.sources["read_bytes_per_s"] == "--disk-read"
    assert d.write_bytes_per_s == load_disk().write_bytes_per_s
    with pytest.raises(ProfileError, match="more than 0"):
        with_rates(load_disk(), None, 0, "x")


def test_plan_summary_shows_the_disk_rates(tmp_path: Path) -> None:
    out = str(tmp_path / "p.json")
    r = CliRunner().invoke(main, [*BASE, "-o", out])
    assert r.exit_code == 0, r.output
    assert "disk       read 3.00 GB/s, write 1.50 GB/s" in r.output and "nvme-pcie4.json" in r.output
    r = CliRunner().invoke(main, [*BASE, "--disk-read", "2GB", "--disk-write", "1GB", "-o", out])
    assert "disk       read 2.00 GB/s, write 1.00 GB/s" in r.output, r.output
    r = CliRunner().invoke(main, [*BASE, "--probe-disk", str(tmp_path), "-o", out])
    assert r.exit_code == 0 and f"measured under {tmp_path}" in r.output, r.output


def test_bad_disk_flags_are_one_error_line(tmp_path: Path) -> None:
    out = str(tmp_path / "p.json")
    r = CliRunner().invoke(main, [*BASE, "--disk-read", "0", "-o", out])
    assert r.exit_code == 2 and "--disk-read must be more than 0" in r.output
    r = CliRunner().invoke(main, [*BASE, "--probe-disk", str(tmp_path / "nope"), "-o", out])
    assert r.exit_code == 2 and "not a directory" in r.output, r.output
