"""vlab.plot: every figure type renders from the recorded files, with the conventions readers
rely on (emulated CPL0 hatched and labelled, native dashed, model dotted, host in the title),
and no figure is drawn for an area without ok rows."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from vlab import results
from vlab.compare import compare
from vlab._errors import UsageError
from vlab.plot import OKABE_ITO, area_figure, area_of, plot, plot_compare

DATA = Path(__file__).parent / "data" / "results"
QUICK = DATA / "pvm_quick.json"
THP_NEVER = DATA / "pvm_quick_thp_never.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_image(path: Path) -> None:
    assert path.exists(), path
    data = path.read_bytes()
    assert len(data) > 2000, path
    if path.suffix == ".png":
        assert data.startswith(PNG_MAGIC), path
    elif path.suffix == ".svg":
        assert b"<svg" in data[:2000], path


def test_every_area_renders_png_and_svg(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    paths = plot([QUICK], tmp_path)
    assert matplotlib.get_backend() == backend  # built on Figure, never through pyplot
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{area}.{fmt}" for area in ("exits", "paging", "io", "migration")
                           for fmt in ("png", "svg"))
    for p in paths:
        check_image(p)


def test_compare_figure_renders(tmp_path):
    a, b = results.read(QUICK), results.read(THP_NEVER)
    paths = plot_compare(compare([a, b], names=[str(QUICK), str(THP_NEVER)]), tmp_path,
                         formats=("png",))
    assert [p.name for p in paths] == ["compare.png"]
    check_image(paths[0])
    three = compare([a, b, a], names=["a.json", "b.json", "c.json"])
    names = [p.name for p in plot_compare(three, tmp_path / "3", formats=("png",))]
    assert len(names) == 2 and len(set(names)) == 2


def test_several_docs_get_distinct_names(tmp_path):
    paths = plot([QUICK, THP_NEVER], tmp_path, formats=("png",))
    assert len(paths) == 8 and len({p.name for p in paths}) == 8
    ids = {results.read(f)["host"]["host_id"] for f in (QUICK, THP_NEVER)}
    assert {p.name.split("-", 1)[0] for p in paths} == ids


def test_no_placeholder_for_areas_without_ok_rows(tmp_path):
    doc = results.read(QUICK)
    only_skips = copy.deepcopy(doc)
    only_skips["rows"] = [r for r in doc["rows"] if r["status"] != "ok"]
    assert only_skips["rows"]
    assert plot(only_skips, tmp_path / "none") == []
    assert list((tmp_path / "none").iterdir()) == []
    exits_only = copy.deepcopy(doc)
    exits_only["rows"] = [r for r in doc["rows"] if area_of(r["experiment"]) == "exits"]
    assert [p.name for p in plot(exits_only, tmp_path / "exits", formats=("png",))] == \
        ["exits.png"]


def _texts(fig) -> str:
    bits = [t.get_text() for t in fig.texts]
    for legend in fig.legends:
        bits += [t.get_text() for t in legend.get_texts()]
    for ax in fig.axes:
        bits += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        bits += [t.get_text() for t in ax.get_yticklabels()]
        if ax.get_legend():
            bits += [t.get_text() for t in ax.get_legend().get_texts()]
    if fig._suptitle is not None:
        bits.append(fig._suptitle.get_text())
    return "\n".join(bits)


def test_exits_figure_conventions():
    doc = results.read(QUICK)
    fig = area_figure(doc, "exits")
    text = _texts(fig)
    assert doc["host"]["host_id"] in text and "Intel Xeon" in text and "shadow paging" in text
    assert "THP always" in text
    assert "emulated CPL0" in text
    assert "guest cycles" in text and "(ns)" in text  # axes name quantity and unit
    assert len(fig.axes) == 2
    hatched = [p for ax in fig.axes for p in ax.patches if p.get_hatch()]
    emulated_rows = [r for r in doc["rows"] if r["status"] == "ok"
                     and (r.get("flags") or {}).get("emulated_cpl0")
                     and r["metric"] in ("guest_cycles", "host_ns")]
    assert len(hatched) == len(emulated_rows)


def test_paging_figure_native_dashed_model_dotted():
    fig = area_figure(results.read(QUICK), "paging")
    lines = [ln for ax in fig.axes for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    by_label = {ln.get_label(): ln for ln in lines}
    natives = [ln for label, ln in by_label.items() if label.startswith("native")]
    models = [ln for label, ln in by_label.items() if "model" in label]
    assert natives and all(ln.get_linestyle() == "--" for ln in natives)
    assert models and all(ln.get_linestyle() == ":" for ln in models)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "working-set size" in ax.get_xlabel()
    assert {ln.get_color().upper() for ln in lines} <= {c.upper() for c in OKABE_ITO}


def test_io_and_migration_figures():
    doc = results.read(QUICK)
    io_fig = area_figure(doc, "io")
    assert [ax.get_xscale() for ax in io_fig.axes] == ["log", "log"]
    assert "Gbit/s" in _texts(io_fig) and "exits per message" in _texts(io_fig)
    mig = area_figure(doc, "migration")
    text = _texts(mig)
    for title in ("dirty pages per interval", "WWS", "pre-copy"):
        assert title in text
    assert "model" in text and "measured" in text


def test_bad_format_and_area():
    with pytest.raises(UsageError):
        plot([QUICK], "/tmp/never-written", formats=("gif",))
    with pytest.raises(UsageError):
        area_figure(results.read(QUICK), "tracing")
