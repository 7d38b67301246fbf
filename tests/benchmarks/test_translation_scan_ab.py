"""The translation-scan A/B's table: converged per bin, TRE p50, likely and wrong."""

from __future__ import annotations

from .scripts import load_benchmark

ab = load_benchmark("translation_scan_ab")


def test_table_counts_converged_cases_per_bin_and_wrong_likely_results() -> None:
    def row(bin_index: int, arm: str, tre: float, verdict: str = "uncertain") -> dict:
        return {"case": f"c{bin_index}", "pair": "ct-mr", "bin": bin_index, "arm": arm,
                "tre": tre, "s": 2.0 + bin_index, "verdict": verdict}

    rows = [row(0, "scan", 0.5, "likely"), row(1, "scan", 1.5), row(3, "scan", 40.0, "likely"),
            row(0, "off", 0.7), row(1, "off", 30.0), row(3, "off", 50.0)]
    text = ab.table(rows)
    assert "| ct-mr | scan | 1/1/0/0 | 2 / 3 | 1.00 | 3.00 | 2 (1) |" in text
    assert "| ct-mr | off | 1/0/0/0 | 1 / 3 | 0.70 | 3.00 | 0 (0) |" in text
