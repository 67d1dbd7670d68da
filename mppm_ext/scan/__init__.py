"""Corpus scans: stream text through models in fixed windows, compute the energy and its parts per token,
aggregate per model with the controls of the findings report (docs/definitions.md), and write tables, plots and reports.

Public API:
    run_scan(ScanConfig(...), out_dir) -> ScanResult   (also under torchrun: each rank scans a share)
    CONTROLS                                            the control flags
    write_report(scan_dir)                              plots + Markdown summary of a scan directory
CLI: ``mppm scan``, ``mppm report`` (mppm_ext/scan/cli.py); ``python -m mppm_ext.scan`` is ``mppm scan``.
"""

from .engine import CONTROLS, ModelScan, ScanConfig, ScanResult, run_scan


def write_report(scan_dir, out_dir=None):
    """Plots and ``report.md`` for the scan in ``scan_dir`` (see :mod:`mppm_ext.scan.report`)."""
    from .report import write_report as _write

    return _write(scan_dir, out_dir)


__all__ = ["run_scan", "ScanConfig", "ScanResult", "ModelScan", "CONTROLS", "write_report"]
