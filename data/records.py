"""Records from the user's JSON and JSON Lines files, each with the place it came from.

Every reader of the user's data (instruction files, PPO's prompt files, preference files)
reads them here, so they all accept the same files and report problems the same way.

Layout, recognised by content, not by the file's name (`datasets.Dataset.to_json` writes
JSON Lines into a file named .json; people save arrays as .jsonl):
    JSON array    the first character is '[': one array of records; "index N" is the
                  0-based index of a record
    JSON Lines    anything else: one record per line, blank lines skipped; "line N" is the
                  1-based line number. A file holding one pretty-printed object (the
                  first line alone is not JSON, the whole file is) is that one record.
A UTF-8 byte order mark (what Windows editors write first) is ignored, at the start of the
file and at the start of a line (files joined with cat). Errors name the line and the
column as an editor shows them (1-based, in characters, the mark not counted).

Each record goes through the caller's `parse`, which returns what the record holds or
raises ValueError saying why it holds nothing usable: such a record is malformed, reported
with its file and line and skipped. A file with more than max_bad_fraction malformed
records stops the run (UserError): at that point the file is in another format, not
slightly dirty. A file that is missing, not UTF-8, not parseable, or without records stops
the run as well.
"""

import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from errors import UserError, require_file

MAX_REPORTED = 10  # malformed records listed one by one per file; the rest are counted
BOM = "\ufeff"


def _first_character(path: Path) -> str:
    with open(path, encoding="utf-8-sig") as f:
        return f.read(4096).lstrip()[:1]


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a JSON array or JSON Lines file, in order.

    where is "line N" (JSON Lines) or "index N" (array). A line that is not valid JSON
    yields a ValueError as its record. UserError for a file that is missing, not UTF-8,
    or an array that does not parse.
    """
    path = require_file(path, "data file", "fix the data paths")
    try:
        if _first_character(path) == "[":
            yield from _array_records(path)
        else:
            yield from _line_records(path)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte offset {e.start}); convert it") from None


def _array_records(path: Path) -> Iterator[tuple[str, object]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path} starts with '[' but is not a valid JSON array (line {e.lineno}, column "
            f"{e.colno}: {e.msg}); fix it, or write one record per line (JSON Lines)"
        ) from None
    if not isinstance(records, list):  # '[' then something else: not reachable for valid JSON
        raise UserError(f"{path} must hold a JSON array of records")
    for i, record in enumerate(records):
        yield f"index {i}", record


def _line_records(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8-sig") as f:
        first = True
        for n, line in enumerate(f, start=1):
            marks = len(line) - len(line.lstrip(BOM))  # a mark left by joining files
            line = line[marks:]
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if first and (whole := _one_object(path)) is not None:
                    yield f"line {n}", whole
                    return
                record = ValueError(f"not valid JSON (column {e.colno + marks}: {e.msg})")
            first = False
            yield f"line {n}", record


def _one_object(path: Path) -> dict | None:
    """The file as one JSON object (pretty-printed over several lines), or None."""
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class FileReport:
    """What reading one file found."""

    path: str
    records: int = 0
    items: list = field(default_factory=list)  # what the records parsed into
    wheres: list[str] = field(default_factory=list)  # per item: "line N" or "index N"
    malformed: list[str] = field(default_factory=list)  # "path:line N: why"

    @property
    def conversations(self) -> list:
        return self.items


def read_data_file(
    path: str | Path,
    parse: Callable[[object], object],
    max_bad_fraction: float = 0.05,
    log: Callable[[str], None] = print,
    what: str = "instruction data",
) -> FileReport:
    """parse(record) for every record of a JSON or JSON Lines file; a record it refuses
    (with a ValueError that says why) is logged with its file and line and skipped.
    UserError when the file holds no records, or more than max_bad_fraction malformed ones."""
    report = FileReport(str(path))
    for where, record in read_records(path):
        report.records += 1
        try:
            if isinstance(record, Exception):
                raise record
            report.items.append(parse(record))
            report.wheres.append(where)
        except ValueError as e:
            report.malformed.append(f"{path}:{where}: {e}")
    bad = len(report.malformed)
    for message in report.malformed[:MAX_REPORTED]:
        log(f"skipping malformed record {message}")
    if bad > MAX_REPORTED:
        log(f"... and {bad - MAX_REPORTED} more malformed records in {path}")
    if report.records == 0:
        raise UserError(f"{what} file {path} holds no records; fix or remove it")
    if bad / report.records > max_bad_fraction:
        raise UserError(
            f"{path}: {bad} of {report.records} records ({bad / report.records:.0%}) are "
            f"malformed, more than max_bad_fraction={max_bad_fraction:g} (first: "
            f"{report.malformed[0]}); fix the file or raise the threshold"
        )
    return report


def file_entry(entry, setting: str, options: tuple[str, ...] = ("weight",)) -> tuple[str, dict]:
    """(path, options) of one entry of a file list (files=[a.jsonl, {path: b.jsonl,
    weight: 0.5}]): a path, or {path, and some of `options`}. UserError naming the
    setting for anything else; a weight must be a number >= 0."""
    if isinstance(entry, (str, Path)) and str(entry):
        return str(entry), {}
    if isinstance(entry, Mapping):  # a dict, or an entry of a Hydra config
        entry = dict(entry)
    allowed = ", ".join(("path", *options))
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), (str, Path)):
        raise UserError(
            f"{setting}: {entry!r} is not a file entry; give a path, or {{{allowed}}} with "
            f"a path, e.g. {setting}=[a.jsonl,{{path:b.jsonl}}]"
        )
    unknown = sorted(set(entry) - {"path", *options})
    if unknown:
        raise UserError(f"{setting}: {entry!r} has unknown keys {unknown}; an entry has {allowed}")
    weight = entry.get("weight", 1.0)
    if "weight" in options and not (
        isinstance(weight, (int, float))
        and not isinstance(weight, bool)
        and math.isfinite(weight)
        and weight >= 0
    ):
        raise UserError(f"{setting}: weight {weight!r} of {entry['path']} must be a number >= 0")
    return str(entry["path"]), {k: v for k, v in entry.items() if k != "path"}
