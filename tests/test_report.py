"""vlab.report: one self-contained HTML file with every figure, table, warning and skip reason,
and (when Chromium is installed) proof that it renders in a real browser without console errors.
"""
from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vlab import results
from vlab._errors import UsageError
from vlab.report import render, report

DATA = Path(__file__).parent / "data" / "results"
QUICK = DATA / "pvm_quick.json"
THP_NEVER = DATA / "pvm_quick_thp_never.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img class="fig" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def two_file_report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert report([QUICK, THP_NEVER], out) == out
    return out


def figure_count(html: str) -> int:
    return int(re.search(r'data-figures-embedded="(\d+)"', html).group(1))


def test_report_embeds_every_figure(two_file_report):
    html = two_file_report.read_text()
    images = IMG_RE.findall(html)
    # 4 areas x 2 files + the comparison's ratio figure
    assert len(images) == 9 == figure_count(html) == html.count("<img")
    for data in images:
        assert base64.b64decode(data).startswith(PNG_MAGIC)
    assert 'id="compare"' in html and "Figure 9." in html


def test_report_is_self_contained(two_file_report):
    html = two_file_report.read_text()
    assert not re.search(r'(src|href)\s*=\s*"(https?:|//)', html)
    assert "@import" not in html and "url(" not in html
    assert '<link rel="stylesheet"' not in html
    assert html.lstrip().startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


def test_report_lists_skips_errors_and_reasons(two_file_report):
    html = two_file_report.read_text()
    for path in (QUICK, THP_NEVER):
        for row in results.read(path)["rows"]:
            if row["status"] != "ok":
                assert row["reason"].replace("'", "&#x27;") in html
    assert 'id="skips"' in html and 'class="status-skip"' in html
    assert 'class="status-error"' in html


def test_report_sections_and_warnings(two_file_report):
    html = two_file_report.read_text()
    assert html.count("How to read this.") == 5  # four areas and the comparison
    for anchor in ("host", "warnings", "area-exits", "area-paging", "area-io",
                   "area-migration", "skips", "compare"):
        assert f'id="{anchor}"' in html
    for kind in ("nested virtualization:", "emulated CPL0:", "noisy:", "model:"):
        assert kind in html
    for path in (QUICK, THP_NEVER):
        assert results.read(path)["host"]["host_id"] in html
    assert re.search(r'<tr class="differs"><td><code>host\.thp\.enabled</code>', html)
    # per-area tables carry the statistics and flags
    for header in ("p50", "p90", "p99", "mean ± stdev", "flags"):
        assert f">{header}<" in html
    assert 'class="tag emul">emulated CPL0' in html and 'class="tag model">model' in html
    # comparison: the THP-backed rows got slower and the table says so
    assert "x slower" in html and "Incomparable: experiment version differs" in html


def test_single_file_has_no_comparison(tmp_path):
    out = report(QUICK, tmp_path / "one.html")
    html = out.read_text()
    assert 'id="compare"' not in html and figure_count(html) == 4


def test_governor_warning_and_missing_areas():
    doc = results.read(QUICK)
    doc = copy.deepcopy(doc)
    doc["host"]["governor"] = "powersave"
    doc["host"]["nested"] = False
    doc["rows"] = [r for r in doc["rows"] if r["experiment"].startswith("exits.")]
    html = render([(doc, "x.json")])
    assert "CPU governor:" in html and "powersave" in html
    assert "nested virtualization:" not in html
    assert 'id="area-paging"' not in html and figure_count(html) == 1


def test_bad_input_writes_nothing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    out = tmp_path / "r.html"
    with pytest.raises(UsageError, match="bad.json"):
        report([QUICK, bad], out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def _row_html(r) -> str:
    """The start of a row's line in an area table."""
    return (f"<tr><td><code>{r['experiment']}</code></td><td><code>"
            f"{results.params_key(r['params']).replace(',', ',<wbr>')}</code></td>"
            f"<td>{r['metric']}</td>")


def _section(html: str, anchor: str) -> str:
    start = html.index(f'<h2 id="{anchor}">')
    end = html.find("<h2 ", start + 1)
    return html[start:end if end > 0 else None]


def test_interrupt_rows_get_their_section_figure_and_tables():
    from irq_docs import irq_doc

    doc = irq_doc()
    html = render([(doc, "irq.json")])
    assert '<a href="#area-interrupts">interrupts</a>' in html
    assert figure_count(html) == 2 and html.count("How to read this.") == 2
    exits, irq = _section(html, "area-exits"), _section(html, "area-interrupts")
    # the exits figure draws every exits.* row; its table leaves the interrupt rows to theirs
    assert exits.count("<img") == 1 and 'href="#area-interrupts"' in exits
    assert irq.count("<img") == 1
    assert "Interrupts: delivery, timer and injection latency" in irq
    for word in ("eoi_cycles", "ipi_cycles", "deadline", "irqfd", "exits per operation",
                 "emulates CPL0"):
        assert word in irq.split("</div>", 1)[0]   # the how-to-read caption
    for r in doc["rows"]:
        if r["status"] != "ok":
            continue
        if r["experiment"] == "exits.nop":
            assert _row_html(r) in exits and _row_html(r) not in irq
        else:
            assert _row_html(r) in irq and _row_html(r) not in exits
    # the injection rows' TSC relation, with its uncertainty in cycles and in ns
    tsc = irq[irq.index("Host-to-guest TSC relation"):]
    assert tsc.count("<tr><td><code>exits.irq_inject</code>") == 2
    for cell in ("KVM_GET_MSRS(IA32_TSC)", ">6,812<", ">8,191<", ">3,155<", ">yes<"):
        assert cell in tsc
    # the failed timer case is listed with its reason, and counted in the section
    assert "no samples were recorded" in _section(html, "skips")
    assert "2 case(s) of this area have no numbers" in irq


def test_report_of_a_recorded_interrupt_run(tmp_path):
    from irq_docs import REAL

    doc = results.read(REAL)
    html = report(REAL, tmp_path / "irq.html").read_text()
    irq = _section(html, "area-interrupts")
    assert figure_count(html) == 2 and irq.count("<img") == 1
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert all(_row_html(r) in irq for r in ok)
    # a file of interrupt experiments only: the exits section has their bars, no table
    exits = _section(html, "area-exits")
    assert exits.count("<img") == 1 and "<table>" not in exits and "interrupt experiments" in exits
    assert irq.count("<tr><td><code>exits.irq_inject</code><") == 4 + 2   # rows + TSC table


def test_interrupts_section_only_for_files_that_have_them():
    from irq_docs import irq_doc

    html = render([(results.read(QUICK), "quick.json"), (irq_doc(), "irq.json")])
    irq = _section(html, "area-interrupts")
    assert "<h3>irq.json" in irq and "quick.json" not in irq
    assert _section(html, "area-exits").count("<img") == 2


# --------------------------------------------------------------------------------------------
# A real browser


# Where the browser test keeps its screenshot (build/ is ignored by git).
SCREENSHOT_KEPT = (Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
                   / "report-chromium.png")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def _run_chromium(exe: str, tmp: Path, url: str, *mode: str) -> subprocess.CompletedProcess:
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr",
            "--v=0", *mode, url]
    env = {**os.environ, "HOME": str(tmp)}
    return subprocess.run(args, capture_output=True, text=True, timeout=180, cwd=tmp, env=env)


def _console_errors(stderr: str) -> list[str]:
    """Console messages and uncaught exceptions Chromium logged for the page. Our page logs
    nothing, so any console line is a problem (missing resource, script error ...)."""
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line or "Uncaught" in line or "Failed to load resource" in line]


@pytest.mark.slow
def test_report_renders_in_chromium(two_file_report, tmp_path):
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium); browser check skipped")
    url = two_file_report.resolve().as_uri()
    dom = _run_chromium(exe, tmp_path, url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    assert attrs.get("data-figures-expected") == "9"
    assert attrs.get("data-figures-loaded") == "9", attrs
    assert _console_errors(dom.stderr) == []

    shot = tmp_path / "shot.png"
    run = _run_chromium(exe, tmp_path, url, f"--screenshot={shot}", "--window-size=1280,4000")
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.exists() and shot.read_bytes().startswith(PNG_MAGIC)
    assert shot.stat().st_size > 50_000  # a real page, not a blank one
    assert _console_errors(run.stderr) == []
    # Kept, as the README says: the last run's screenshot outlives the test's temporary dir.
    keep = SCREENSHOT_KEPT
    keep.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, keep)
    assert keep.read_bytes().startswith(PNG_MAGIC)


def test_console_error_detection_would_fire():
    # The browser test is only as good as its detector: feed it the lines Chromium writes.
    stderr = ('[1:1:1121/193409.709958:INFO:CONSOLE:1] "Uncaught ReferenceError: x is not '
              'defined", source: file:///r.html (1)\n[1:2:ERROR:dbus/bus.cc:405] Failed to '
              'connect to the bus')
    assert len(_console_errors(stderr)) == 1
