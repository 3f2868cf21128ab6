"""One accuracy run, recorded for `results/`: the `metrics.json` that `mnist-study
retrain` wrote, with the machine that ran it, under `<what>-<device>-<date>.json`.

    python -m benchmarks.result_record runs/params/metrics.json --what single-2x1024 --out results

`<device>` is `cpu`, `h100`, `h200`, ... (`study_record.describe`), the date is UTC.
The metrics keep their keys (`test_accuracy` at the top level, the fold ensemble's under
`ensemble`); `machine`, `torch` and `recorded` are added. It must run on the machine
that trained, which it describes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

from benchmarks.study_record import RecordError, describe


def record_result(metrics_path: Path, what: str, out_dir: Path) -> Path:
    """Write the record into `out_dir` and return its path."""
    import torch

    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", what):
        raise RecordError(f"--what {what!r}: lower-case letters, digits, dots and dashes")
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as exc:
        raise RecordError(f"{metrics_path}: cannot read its metrics ({exc})") from None
    if not isinstance(metrics, dict) or "test_accuracy" not in metrics:
        raise RecordError(f"{metrics_path}: not a retrain's metrics (no test_accuracy)")
    name, slug = describe(str(metrics.get("device", "cpu")))
    now = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "test_accuracy": metrics["test_accuracy"],
        **metrics,
        "machine": name,
        "torch": torch.__version__,
        "recorded": now.isoformat(timespec="seconds"),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{what}-{slug}-{now.date().isoformat()}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.result_record", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("metrics", type=Path, help="the metrics.json mnist-study retrain wrote")
    parser.add_argument("--what", required=True, help="what ran, e.g. single-2x1024 or wide")
    parser.add_argument("--out", type=Path, default=Path("results"), help="default: results")
    args = parser.parse_args(argv)
    try:
        path = record_result(args.metrics, args.what, args.out)
    except RecordError as exc:
        print(f"result_record: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
