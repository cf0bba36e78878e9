"""``precisionrt-log``: read precision switch logs offline.

    precisionrt-log summarize RUN_OR_LOG... [--json] [--follow [--interval S]]
    precisionrt-log compare LOG_A LOG_B [--json]
    precisionrt-log timeline LOG -o timeline.png [--layers PATTERN]
    precisionrt-log plot RUN_DIR [-o FILE]      (default RUN_DIR/run.png: the picture every command draws)
    precisionrt-log export LOG... -o out.csv|out.parquet      (CSV cells starting with = + - @ are escaped)

A RUN_OR_LOG is a run directory (its precision_events.jsonl) or a log file; several merge by run id (ranks,
resumed segments). Corrupt or truncated lines are skipped and counted (``skipped_lines``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from precisionrt.observe import analysis, plot


def _print_summary(result: dict) -> None:
    for run in result["runs"]:
        share = run["fp8_flop_fraction"]
        print(f"run {run['run']}: {run['steps']} steps{'' if run['ended'] else ' (no run_end yet)'}, "
              f"{run['promotions']} promotions, {run['demotions']} demotions, "
              f"FP8 share of GEMM FLOPs {'n/a' if share is None else f'{share:.1%}'}")
        print(f"  {'layer':<48} {'time in fp8':>11} {'first promotion':>16}  {'now (fprop dgrad wgrad)':<24} reasons")
        for name, layer in run["layers"].items():
            frac = layer["fp8_time_fraction"]
            reasons = ", ".join(f"{k} x{v}" for k, v in {**layer["promotions"], **{
                f"back:{k}": v for k, v in layer["demotions"].items()}}.items()) or "-"
            first = layer["first_promotion_step"]
            now = " ".join(g["final_precision"] for g in layer["gemms"].values())
            print(f"  {name:<48} {'n/a' if frac is None else f'{frac:.1%}':>11} "
                  f"{'-' if first is None else first:>16}  {now:<24} {reasons}")
        for sw in run["rollout_switches"]:   # RL runs: the rollout engine's side
            print(f"  rollout side, step {sw['step']} (map version {sw['map_version']}): {sw['layer']} "
                  f"{sw['from']} -> {sw['to']} ({sw['reason']})")
    if result["skipped_lines"]:
        print(f"skipped {result['skipped_lines']} unreadable line(s), e.g. {result['skipped_examples'][0]}")


def cmd_summarize(args) -> int:
    while True:
        result = analysis.summarize(args.paths)
        if args.json:
            print(analysis.dumps(result), flush=True)
        else:
            _print_summary(result)
        if not result["runs"] and not args.follow:
            print(f"precisionrt-log: no readable run in {args.paths} ({result['unreadable']})", file=sys.stderr)
            return 1
        if not args.follow or all(r["ended"] for r in result["runs"]):
            return 0
        time.sleep(args.interval)
        print(flush=True)


def cmd_compare(args) -> int:
    result = analysis.compare(args.a, args.b)
    if args.json:
        print(analysis.dumps(result))
        return 0
    if result["identical"]:
        print("identical precision timelines")
    for name, d in result["layers"].items():
        print(f"{name}: differs from step {d['first_difference_step']}")
        for side in ("only_in_a", "only_in_b"):
            for s in d[side]:
                print(f"  {side[-1].upper()} only: step {s['step']} {s['gemm']} {s['from']} -> {s['to']} "
                      f"({s['reason']})")
    return 0


def _draw(draw, *args, **kwargs) -> int:
    """A picture: its path on stdout, or one line on stderr and exit 2."""
    try:
        out = draw(*args, **kwargs, say=lambda note: print(f"precisionrt-log: {note}", file=sys.stderr))
    except RuntimeError as e:
        print(f"precisionrt-log: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def cmd_timeline(args) -> int:
    return _draw(analysis.timeline, args.path, args.output, layers=args.layers)


def cmd_plot(args) -> int:
    return _draw(plot.plot_run, args.run_dir, args.output)


def csv_cell(value):
    """A value as a CSV cell that a spreadsheet shows as text: a string starting with ``= + - @`` (or a tab or
    carriage return) is a formula to Excel and LibreOffice (a layer name ``=HYPERLINK(...)``), so it gets a
    leading ``'``. Numbers, and strings that are numbers (``"-inf"``), stay as they are."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def cmd_export(args) -> int:
    skipped = analysis.Skipped()
    rows = list(analysis.export_rows(args.paths, skipped))
    if not skipped.records:   # an empty or foreign file: writing an empty table would look like a quiet run
        print(f"precisionrt-log: nothing readable in {args.paths} ({skipped.explain()}); {args.output} not written",
              file=sys.stderr)
        return 1
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = Path(args.output)
    if out.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            print("export to parquet needs pyarrow: pip install 'precisionrt[analysis]'", file=sys.stderr)
            return 2
        pq.write_table(pa.Table.from_pylist(rows), out)
    elif out.suffix == ".csv":
        with open(out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    else:
        print(f"export: {out} must end in .csv or .parquet", file=sys.stderr)
        return 2
    print(f"wrote {len(rows)} rows to {out}; skipped {skipped.count} unreadable line(s)")
    return 0


def _seconds(text: str) -> float:
    """A ``--interval``: a finite number of seconds > 0 (argparse names the option on error)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="precisionrt-log", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summarize", help="per-layer time in FP8, promotions, FLOP share")
    s.add_argument("paths", nargs="+")
    s.add_argument("--json", action="store_true")
    s.add_argument("--follow", action="store_true", help="re-read until every run has ended")
    s.add_argument("--interval", type=_seconds, default=5.0, help="seconds between re-reads (default 5)")
    s.set_defaults(func=cmd_summarize)
    c = sub.add_parser("compare", help="which layers' timelines differ, and from when")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare)
    t = sub.add_parser("timeline", help="layer x step precision picture (PNG) with switch markers")
    t.add_argument("path")
    t.add_argument("-o", "--output", required=True)
    t.add_argument("--layers", metavar="PATTERN", help="draw only the layers this fnmatch pattern names "
                   f"(past {analysis.MAX_ROWS} layers the rows are aggregates otherwise)")
    t.set_defaults(func=cmd_timeline)
    pl = sub.add_parser("plot", help="the run's picture (PNG): reward or loss, staleness and IcePop's masked "
                        "share (RL), the precision timeline")
    pl.add_argument("run_dir")
    pl.add_argument("-o", "--output", help=f"default RUN_DIR/{plot.PICTURE}")
    pl.set_defaults(func=cmd_plot)
    e = sub.add_parser("export", help="flat table of switches and stats")
    e.add_argument("paths", nargs="+")
    e.add_argument("-o", "--output", required=True)
    e.set_defaults(func=cmd_export)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:   # `precisionrt-log summarize ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error when Python flushes
        return 0
    except (OSError, ValueError) as err:   # a missing file, a log without a run, logs that cannot be compared
        print(f"precisionrt-log: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
