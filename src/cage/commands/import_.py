"""`cage import claude-code|codex|jsonl [PATH ...]`: transcripts and logs -> the spend ledger.

Translation only: the formats live in ``cage.importers``. A bad line never stops an import:
everything readable is imported first. The exit status is 0 when every line and file could
be read; 1 when a line was bad, a path given or found could not be read, or no input exists
where the defaults point (DESIGN.md: every bad input gives a non-zero exit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cage.errors import TranscriptError

# source -> (module under cage.importers, what PATH means, default location, help line)
SOURCES: dict[str, tuple[str, str, str, str]] = {
    "claude-code": (
        "claude_code",
        "DIR",
        "$CLAUDE_CONFIG_DIR (comma list) else $XDG_CONFIG_HOME/claude (~/.config/claude) "
        "and ~/.claude; projects/ under each",
        "Claude Code transcripts: every *.jsonl under projects/",
    ),
    "codex": (
        "codex",
        "DIR",
        "$CODEX_HOME/sessions else ~/.codex/sessions",
        "Codex CLI rollouts: every rollout-*.jsonl (token_count events)",
    ),
    "jsonl": (
        "jsonl",
        "FILE",
        "",
        "AttributionEvent-style JSONL, one event object per line",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Configure the `import` command's arguments: one sub-command per source."""
    sub = parser.add_subparsers(dest="source", metavar="SOURCE")
    for name, (_module, metavar, default, help_line) in SOURCES.items():
        description = help_line + "."
        if default:
            description += f" Default location: {default}."
        description += (
            " Incremental: a second import reads only what was appended since the first;"
            " duplicates are skipped by request id."
        )
        p = sub.add_parser(name, help=help_line, description=description)
        p.add_argument(
            "paths",
            nargs="+" if not default else "*",
            metavar=metavar,
            help="files or folders to import" + ("" if not default else " (default: see above)"),
        )
        p.add_argument(
            "--ledger",
            metavar="PATH",
            help="ledger file (default: $CAGE_LEDGER or the user data dir)",
        )
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        p.add_argument(
            "--full",
            action="store_true",
            help="read every file from the start, ignoring the saved import state",
        )


def run(args: argparse.Namespace) -> int:
    """Import one source into the ledger and print the report."""
    import importlib
    from pathlib import Path

    from cage.errors import UsageError
    from cage.importers.common import (
        PIPELINE_MIN_BYTES,
        DedupWindow,
        ImportReport,
        Progress,
        StateStore,
        can_pipeline,
        import_files,
        import_files_pipelined,
        reader_count,
        sizes_to_read,
    )
    from cage.ledger import Ledger, RowBatch

    if not getattr(args, "source", None):
        raise UsageError("say what to import: cage import claude-code|codex|jsonl [PATH ...]")
    module_name, _metavar, default_where, _help = SOURCES[args.source]
    importer = importlib.import_module(f"cage.importers.{module_name}")
    report = ImportReport(source=args.source)

    if args.paths:
        roots = []
        for given in args.paths:
            path = Path(os.path.expanduser(given))  # never raises for "~nosuchuser"
            if path.exists():
                roots.append(path)
            else:
                report.fail(given, "no such file or directory")
    else:
        roots = importer.default_roots()
        if not roots:
            raise TranscriptError(
                f"no {args.source} transcripts found (looked in {default_where}); "
                f"pass the folder to import: cage import {args.source} DIR"
            )

    files: list[Path] = []
    seen: set[str] = set()
    for root in roots:
        for path in importer.find_files(root, report):
            key = str(path.resolve())
            if key not in seen:
                seen.add(key)
                files.append(path)

    ledger = Ledger.open(args.ledger)
    state_path = getattr(ledger, "path", None)
    state = StateStore(state_path)
    total, to_read = sizes_to_read(importer.SOURCE, files, state, args.full)
    window = DedupWindow() if args.source == "claude-code" else None
    prepare, write, load_prices = _ledger_writer(ledger)
    try:
        if to_read >= PIPELINE_MIN_BYTES and can_pipeline():
            # Parsing costs about twice what writing does: readers in parallel (one per
            # CPU), this process writes. The price table is loaded once, before they fork.
            load_prices()
            import_files_pipelined(
                importer.SOURCE,
                files,
                importer.FileParser,
                write,
                state,
                state_path,
                report,
                total_bytes=total,
                full=args.full,
                window=window,
                prepare=prepare,
                combine=RowBatch.combine,
                readers=reader_count(to_read, len(files)),
            )
        else:
            progress = Progress(total, f"importing {args.source}")
            try:
                import_files(
                    importer.SOURCE,
                    files,
                    importer.FileParser,
                    lambda batch: write(prepare(batch)),
                    state,
                    report,
                    full=args.full,
                    window=window,
                    progress=progress,
                )
            finally:
                progress.finish()
    finally:
        state.close()
        ledger.close()

    if args.json:
        document = report.to_dict()
        document["ledger"] = getattr(ledger, "location", args.ledger)
        print(json.dumps(document, indent=2))
    else:
        for line in report.text_lines():
            print(line)
    # DESIGN.md: every bad input gives a non-zero exit. Everything readable is imported
    # first; bad lines are consumed, so the next import (of new lines) is clean again.
    if args.json:
        for failure in report.failures:
            print(f"cage: {failure}", file=sys.stderr)
    if report.bad_lines:
        print(
            f"cage: {report.bad_lines} bad line(s) skipped (listed in the report above); "
            "the rest was imported",
            file=sys.stderr,
        )
    return 1 if report.failures or report.bad_lines else 0


def _ledger_writer(ledger):  # type: ignore[no-untyped-def]
    """(prepare, write, load_prices): event fields -> priced rows; rows -> the ledger.

    ``prepare`` does the per-row work (in the reader process when the import is pipelined):
    a call without a cost is priced from the table (truth ``modeled``, or still
    ``estimated``), exactly as ``cage.pricing.price_event`` would. The importers validate
    every field as they parse it, so rows are built without checking them again.
    ``write`` stores a prepared batch in one transaction: (inserted, duplicates).
    ``load_prices()`` loads the price table now (before forking readers that price).
    """
    from cage.ledger import RowBatch
    from cage.pricing import Pricer

    pricer = Pricer()

    def prepare(batch: list[dict]) -> RowBatch:
        rows = RowBatch()
        rows.add_many_fields(batch, pricer)
        return rows

    ledger.bulk_mode()

    def write(rows: RowBatch) -> tuple[int, int]:
        return ledger.add_batch(rows)

    return prepare, write, pricer.load
