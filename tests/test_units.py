"""vlab._units: the one size parser (plot, `-p`, migrate options), rates, the page size."""
from __future__ import annotations

import pytest

from vlab import _units
from vlab._errors import UsageError
from vlab._units import format_size, parse_rate, parse_size, size_bytes


def test_parse_size():  # moved from test_plot (plot.parse_size is now vlab._units.size_bytes)
    assert size_bytes(4096) == 4096 and size_bytes("64M") == 64 << 20
    assert size_bytes("1GiB") == 1 << 30 and size_bytes("4k") == 4096
    assert size_bytes("fast") is None and size_bytes(True) is None


@pytest.mark.parametrize("text, n", [
    ("4k", 4096), ("4K", 4096), ("4KiB", 4096), ("4kb", 4096), ("64 M", 64 << 20),
    ("1.5K", 1536), ("2m", 2 << 20), ("1g", 1 << 30), ("1T", 1 << 40), ("512B", 512),
    ("512", 512), (" 8M ", 8 << 20), (4096.0, 4096), (0, 0),
])
def test_size_forms(text, n):
    assert size_bytes(text) == n


@pytest.mark.parametrize("text", [
    "", "M", "-1M", "1e3M", "inf", "nan", "0x1000", "1.3K", "4ib", "4 kk", "4P", "4kbit",
    -1, 1.5, None, [4096], "hugetlb-2m",
])
def test_not_sizes(text):
    assert size_bytes(text) is None


def test_parse_size_and_rate_raise_one_line():
    # the assertions of tests/test_migrate.py::test_addresses_and_sizes, against the one parser
    assert parse_size("64M", "m") == 64 << 20 and parse_size("1GiB", "m") == 1 << 30
    assert parse_rate("2G", "b") == 2e9 and parse_rate("100Mbit/s", "b") == 1e8
    for bad in ("fast", "-1M", "0", "inf", "nan", "1e3"):
        with pytest.raises(UsageError) as e:
            parse_size(bad, "--mem")
        assert "--mem" in str(e.value) and "\n" not in str(e.value)
    assert parse_rate("1gbps", "b") == 1e9 and parse_rate("10k", "b") == 1e4
    for bad in ("fast", "0", "-1G", "b", "inf"):
        with pytest.raises(UsageError):
            parse_rate(bad, "--bandwidth")


def test_format_size_and_page():
    assert format_size(4096) == "4K" and format_size(1 << 30) == "1G"
    assert format_size(1536) == "1.5K" and format_size(100) == "100"
    assert _units.PAGE == 4096
    assert _units.PAGE_SIZES == {"4k": 4096, "2m": 2 << 20, "1g": 1 << 30}


def test_param_values_use_the_size_parser():
    from vlab.run.registry import parse_param, parse_value

    assert parse_param("wss=64M,1GiB,4kb,1.5K") == ("wss", [64 << 20, 1 << 30, 4096, 1536])
    assert parse_value("0x10") == 16 and parse_value("true") is True
    assert parse_value("hugetlb-2m") == "hugetlb-2m" and parse_value("zipf:1.2") == "zipf:1.2"
