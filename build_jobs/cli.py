"""``python -m build_jobs`` / ``fa3trt-build``: build every engine of a serve config on Ray.

Prints the plan, a progress bar while the tasks run, and a table of results (key, GPU type,
build time, size, status), then each failure's worker error. Exit codes: 0 when every item
was built or already in the store, 1 when any item failed, 2 for a bad config or arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from build_jobs.plan import BuildItem
from build_jobs.runner import BuildResult, build_all
from fa3trt import defaults
from fa3trt.errors import Fa3TrtError

__all__ = ["main", "format_table", "format_plan"]


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), line, *(fmt(r) for r in rows)])


def format_plan(plan: Sequence[BuildItem]) -> str:
    rows = [
        [
            i.app,
            i.gpu_type or "-",
            i.backend,
            i.model.describe(),
            i.action,
            i.item_key,
            i.reason,
        ]
        for i in plan
    ]
    to_build = sum(i.action == "build" for i in plan)
    head = f"plan: {len(plan)} items, {to_build} to build, {len(plan) - to_build} skipped"
    return head + "\n" + _table(["app", "gpu type", "backend", "model", "action", "item key", "why"], rows)


def format_table(results: Sequence[BuildResult]) -> str:
    """The final table: key, GPU type, build time, size, status (and where it ran)."""
    rows = [
        [
            r.key,
            r.gpu_type or "-",
            r.spec,
            r.backend,
            "-" if r.seconds is None else f"{r.seconds:.1f}s",
            "-" if r.export_seconds is None else f"{r.export_seconds:.1f}s",
            _size(r.size),
            r.status,
            ",".join(r.gpu_ids) or (r.cuda_visible_devices or "-"),
        ]
        for r in results
    ]
    return _table(["key", "gpu type", "app", "backend", "build time", "onnx export", "size", "status", "gpus"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m build_jobs", description=__doc__.split("\n")[0])
    p.add_argument(
        "--config", default=defaults.SERVE_CONFIG, help="Serve config whose fa3trt applications are the engine specs"
    )
    p.add_argument("--store", default=None, help="store folder or fsspec URI; overrides each application's `store`")
    p.add_argument("--dry-run", action="store_true", help="print the plan and build nothing")
    p.add_argument("--force", action="store_true", help="rebuild items already in the store")
    p.add_argument(
        "--address", default=None, help="Ray cluster: 'auto', 'ray://host:10001', 'local' (default: Ray's resolution)"
    )
    p.add_argument(
        "--backend", choices=("auto", "tensorrt", "torch"), default=None, help="override each application's backend"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=defaults.BUILD_RETRIES,
        help=f"retries of a failed task (default {defaults.BUILD_RETRIES})",
    )
    p.add_argument("--json", dest="json_path", default=None, help="also write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="INFO logs")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.retries < 0:
        p.error(f"--retries must be >= 0, got {args.retries}")

    def show_plan(plan: Sequence[BuildItem]) -> None:
        print(format_plan(plan), flush=True)

    try:
        results = build_all(
            args.config,
            store=args.store,
            force=args.force,
            address=args.address,
            dry_run=args.dry_run,
            backend=args.backend,
            max_retries=args.retries,
            progress=not args.no_progress,
            plan_callback=show_plan,
        )
    except Fa3TrtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(format_table(results))
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"\nFAILED {r.spec} on {r.gpu_type or '-'}: {r.error}", file=sys.stderr)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump([r.to_dict() for r in results], f, indent=1, default=str)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "skipped", "planned", "failed")}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
