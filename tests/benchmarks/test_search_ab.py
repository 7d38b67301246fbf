"""The search A/B's table: converged per bin, TRE p50, likely and wrong."""

from __future__ import annotations

from .scripts import load_benchmark

ab = load_benchmark("search_ab")


def test_table_counts_converged_cases_per_bin_and_wrong_likely_results() -> None:
    def row(bin_index: int, arm: str, tre: float, verdict: str = "uncertain") -> dict:
        return {"case": f"c{bin_index}", "pair": "ct-mr", "bin": bin_index, "arm": arm,
                "tre": tre, "s": 2.0 + bin_index, "verdict": verdict}

    rows = [row(0, "scan", 0.5, "likely"), row(1, "scan", 1.5), row(3, "scan", 40.0, "likely"),
            row(0, "off", 0.7), row(1, "off", 30.0), row(3, "off", 50.0)]
    text = ab.table(rows)
    assert "| ct-mr | scan | 1/1/0/0 | 2 / 3 | 1.00 | 3.00 | 2 (1) |" in text
    assert "| ct-mr | off | 1/0/0/0 | 1 / 3 | 0.70 | 3.00 | 0 (0) |" in text


def test_each_change_is_undone_inside_its_block_and_restored_after() -> None:
    from disa.registration import pipeline

    shipped = (pipeline.MAX_RIVALS, pipeline.SearchSettings().fine_ranked_cut,
               pipeline.SearchSettings().placed_step_fraction, pipeline.scan_poses)
    with ab.CHANGES["search-1207"]():
        assert pipeline.MAX_RIVALS == 3
        assert pipeline.SearchSettings().fine_ranked_cut is False
        assert pipeline.SearchSettings().placed_step_fraction == 1.0
        assert pipeline.scan_poses is not shipped[3]
    assert (pipeline.MAX_RIVALS, pipeline.SearchSettings().fine_ranked_cut,
            pipeline.SearchSettings().placed_step_fraction, pipeline.scan_poses) == shipped
    assert shipped[0] > 3 and shipped[1] is True and shipped[2] < 1.0
    for name, change in ab.CHANGES.items():
        with change():
            undone = (pipeline.MAX_RIVALS, pipeline.SearchSettings().fine_ranked_cut,
                      pipeline.SearchSettings().placed_step_fraction, pipeline.scan_poses,
                      ab.translation_scan.SCAN_PER_BIN)
        assert undone != (*shipped, ab.translation_scan.SCAN_PER_BIN), name


def test_a_baseline_run_is_tabled_as_before_and_moved_cases_are_listed(tmp_path) -> None:
    import json

    def row(case: str, arm: str, tre: float) -> dict:
        return {"case": case, "pair": "ct-mr", "bin": 0, "arm": arm, "tre": tre, "s": 1.0,
                "verdict": "uncertain"}

    path = tmp_path / "earlier.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (
        row("a", "search-1207", 1.0), row("a", "off", 50.0), row("b", "search-1207", 40.0),
        row("c", "search-1207", 2.0))))
    before = ab.earlier(path)
    assert [(r["case"], r["arm"]) for r in before] == [("a", "before"), ("b", "before"),
                                                        ("c", "before")]
    rows = [*before, row("a", "shipped", 30.0), row("b", "shipped", 3.0),
            row("c", "shipped", 2.5)]
    text = ab.moved(rows)
    assert "- a: 1.0 mm (uncertain) -> 30.0 mm (uncertain)" in text
    assert "- b: 40.0 mm" in text and "- c:" not in text
    assert ab.moved(before) == "- none"
