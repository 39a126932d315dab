"""``python -m bench``: run the benchmark, print the table and the targets, write the JSON.

See :mod:`bench` for what is measured and :mod:`bench.runner` for how. Everything
runs under one temporary directory under /tmp (short socket paths), removed at
the end whatever happens. Exit status: 0 when every call succeeded and every
check held, 1 otherwise (the table and the JSON are written either way), 2 for
bad options.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench.corpus import Corpus
from bench.options import parse_options
from bench.procs import run_id
from bench.recall_eval.quality import measure_recall, render_recall
from bench.report import Report, evaluate_targets, render_targets
from bench.runner import log, run_sizes

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit status (see the module docstring)."""
    options = parse_options(argv)
    identity = run_id()
    temp_root = Path(tempfile.mkdtemp(prefix="agb-", dir="/tmp"))
    report = Report(options=options.to_json(), workload=Corpus().describe(), run_id=identity, temp_root=str(temp_root))
    log(f"run {identity}: sizes {options.sizes}, clients {options.clients}, transports {options.transports}")
    try:
        asyncio.run(run_sizes(options, temp_root, report))
        if not options.quick:
            log("recall quality on the eval set (bench/recall_eval)")
            report.recall = measure_recall(temp_root)
    except Exception as error:
        report.problems.append(f"the run stopped: {type(error).__name__}: {error}")
        log(f"the run stopped: {type(error).__name__}: {error}")
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
        report.finished_at = datetime.now(UTC).isoformat()
    targets = evaluate_targets(report)
    report.write_json(options.json_path, targets)
    print(report.table())
    print()
    if report.recall is not None:
        print(render_recall(report.recall))
        print()
    print(render_targets(targets))
    if report.problems:
        print("\nproblems:\n  " + "\n  ".join(report.problems))
    print(f"\nJSON: {options.json_path}")
    return 1 if report.problems else 0
