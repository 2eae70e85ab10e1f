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


# --------------------------------------------------------------------------------------------
# The interrupts figure (synthetic documents in tests/irq_docs.py, one real file)


def _panels(fig) -> dict[str, tuple]:
    """Title -> (main axes, its exits-per-operation twin) of the interrupts figure."""
    mains = [ax for ax in fig.axes if ax.get_title()]
    twins = [ax for ax in fig.axes if not ax.get_title()]
    assert len(mains) == len(twins)
    out = {}
    for ax in mains:
        twin = next(t for t in twins if t.get_position().bounds == ax.get_position().bounds)
        out[ax.get_title().split(":")[0].split(",")[0]] = (ax, twin)
    return out


def _ticks(ax) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels()]


def _bars(ax) -> list:
    from matplotlib.patches import Rectangle

    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_interrupts_figure_splits_delivery_and_annotates_exits():
    from matplotlib.colors import to_hex

    from irq_docs import irq_doc

    doc = irq_doc()
    fig = area_figure(doc, "interrupts")
    panels = _panels(fig)
    assert set(panels) == {"delivery", "TSC-deadline timer", "interrupt injection"}
    ax, twin = panels["delivery"]
    ok = {(r["experiment"], results.params_key(r["params"]), r["metric"]): r
          for r in doc["rows"] if r["status"] == "ok"}
    # cases in order: deliveries (two bars each), then the accesses that deliver nothing;
    # exits.nop and skipped cases are not interrupt deliveries and are not drawn here
    assert _ticks(ax) == ["ipi_self @CPL3 (apic=xapic)", "ipi_self @CPL0 (apic=x2apic)",
                          "ipi_other @CPL3 (apic=xapic, target=halted)",
                          "tsc_deadline @CPL0 (timer=expired, apic=xapic)",
                          "tsc_deadline @CPL0 (timer=future, apic=xapic)",
                          "eoi @CPL3 (apic=xapic)", "cr8 @CPL0 (direction=read)"]
    assert _ticks(twin) == ["2.02", "1.03", "5.05", "1.06", "1.09", "1", "0.0049"]
    assert "exits per operation" in twin.get_ylabel()
    # top to bottom: per delivery case the rest of the round (ipi_cycles) then the EOI, then
    # the whole operations; every bar as long as its row's p50, hatched iff emulated CPL0
    cases = list(dict.fromkeys((e, p) for e, p, _ in ok if e not in ("exits.irq_inject",
                                                                       "exits.nop")))
    expected = [(ok[(e, p, m)], colour) for e, p in cases if e not in ("exits.eoi", "exits.cr8")
                for m, colour in (("ipi_cycles", OKABE_ITO[0]), ("eoi_cycles", OKABE_ITO[3]))]
    expected += [(ok[(e, p, "guest_cycles")], None) for e, p in cases
                 if e in ("exits.eoi", "exits.cr8")]
    bars = sorted(_bars(ax), key=lambda b: b.get_y())
    assert len(bars) == len(expected) == 5 * 2 + 2
    for bar, (row, colour) in zip(bars, expected):
        assert bar.get_width() == pytest.approx(row["median"])
        assert bool(bar.get_hatch()) == bool((row.get("flags") or {}).get("emulated_cpl0"))
        if colour:
            assert to_hex(bar.get_facecolor(), keep_alpha=False) == colour.lower()
    assert ax.get_xscale() == "log" and "guest cycles" in ax.get_xlabel()

    ax, twin = panels["TSC-deadline timer"]
    assert _ticks(ax) == ["@CPL0 (timer=future, apic=xapic)"]  # the expired case has no latency
    assert [b.get_width() for b in _bars(ax)] == \
        [pytest.approx(ok[("exits.tsc_deadline", "apic=xapic,cpl=0,timer=future",
                           "timer_latency_cycles")]["median"])]
    assert _ticks(twin) == ["1.09"]

    ax, twin = panels["interrupt injection"]
    assert _ticks(ax) == ["wait=spin", "wait=halt"]
    assert [b.get_width() for b in _bars(ax)] == [
        pytest.approx(ok[("exits.irq_inject", f"wait={w}", "latency_ns")]["median"])
        for w in ("spin", "halt")]
    assert "(ns)" in ax.get_xlabel()
    # KVM's exits over one call per injection (145/32, 105/32), from the rows' extra
    assert _ticks(twin) == ["4.531", "3.281"] and "per injection" in twin.get_ylabel()
    # the TSC offset's uncertainty (8,191 cycles at 2,596,098 kHz = 3,155 ns) beside the p50
    notes = [t.get_text() for t in ax.texts]
    assert notes == ["151,000 ± 3,155", "79,000 ± 3,155"]

    text = _texts(fig)
    assert doc["host"]["host_id"] in text and "shadow paging" in text
    assert "emulated CPL0" in text and "eoi_cycles" in text and "ipi_cycles" in text
    assert "uncertainty of the host-to-guest TSC offset" in text


def test_interrupts_figure_negative_timer_latency_keeps_zero():
    # KVM's lapic_timer_advance can fire a deadline timer early: a negative latency is drawn
    # on a linear axis that shows zero, not dropped by a log scale
    from irq_docs import irq_doc

    fig = area_figure(irq_doc(timer_latency=[-300.0, -120.0, 80.0, 200.0]), "interrupts")
    ax, _ = _panels(fig)["TSC-deadline timer"]
    assert ax.get_xscale() == "linear" and ax.get_xlim()[0] < 0 < ax.get_xlim()[1]
    assert [b.get_width() for b in _bars(ax)] == [pytest.approx(-20.0)]


def test_interrupts_figure_only_what_was_measured(tmp_path):
    from irq_docs import doc_of, inject_rows, irq_doc

    doc = irq_doc()
    # without interrupt rows (or with only failed ones) there is no interrupts figure
    assert area_figure(results.read(QUICK), "interrupts") is None
    failed = copy.deepcopy(doc)
    failed["rows"] = [r for r in doc["rows"] if r["status"] != "ok"]
    assert area_figure(failed, "interrupts") is None
    # injection alone: one panel, no delivery bars, no empty axes
    only = area_figure(doc_of(inject_rows("spin", 151_000, 145)), "interrupts")
    assert set(_panels(only)) == {"interrupt injection"}
    # plot writes it beside the exits figure
    assert sorted(p.name for p in plot(doc, tmp_path, formats=("png", "svg"))) == \
        ["exits.png", "exits.svg", "interrupts.png", "interrupts.svg"]
    for p in tmp_path.iterdir():
        check_image(p)


def test_interrupts_figure_of_a_recorded_run(tmp_path):
    # tests/data/results/pvm_interrupts.json.gz: `vlab run exits.ipi_other exits.tsc_deadline
    # exits.irq_inject` on the PVM host, unmodified (gzip'ed)
    from irq_docs import REAL

    doc = results.read(REAL)
    fig = area_figure(doc, "interrupts")
    panels = _panels(fig)
    ax, twin = panels["delivery"]
    assert len(_ticks(ax)) == 10 and len(_bars(ax)) == 20
    assert _ticks(twin)[:2] == ["3.25", "5.055"]
    ax, _ = panels["TSC-deadline timer"]
    assert _ticks(ax) == ["@CPL0 (timer=future, apic=xapic)", "@CPL0 (timer=future, apic=x2apic)"]
    ax, twin = panels["interrupt injection"]
    assert _ticks(ax) == ["wait=spin", "wait=halt"] and ax.get_xscale() == "log"
    assert _ticks(twin) == ["4.531", "3.281"]
    hatched = [b for a in fig.axes for b in _bars(a) if b.get_hatch()]
    emulated = [r for r in doc["rows"] if r["status"] == "ok"
                and (r.get("flags") or {}).get("emulated_cpl0")
                and r["metric"] in ("ipi_cycles", "eoi_cycles", "timer_latency_cycles",
                                    "latency_ns")]
    assert len(hatched) == len(emulated) == 20
    paths = plot([REAL], tmp_path, formats=("png",))
    assert [p.name for p in paths] == ["exits.png", "interrupts.png"]
    check_image(paths[1])
