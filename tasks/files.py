"""Reading data files: JSONL rows, text lines, the project's assets, hub datasets. Bad input stops
with one line that names the file and the line."""
import json
from pathlib import Path

import common
from common import UserError


def read_jsonl(path):
    """[(line number, row)] of a JSONL file; each non-blank line must be a JSON object."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = "not JSON"
        if line.strip() and not isinstance(row, dict):
            raise UserError(f"{path} line {i} is not a JSON object; expected one JSON object per line")
        rows += [(i, row)] if row is not None else []
    if not rows:
        raise UserError(f"{path} has no rows")
    return rows


def check_rows(rows, columns, where):
    """Every (line, row) has every column as a non-empty string; else one line naming file and line."""
    missing = [c for c in columns if c not in rows[0][1]]
    if missing:
        raise UserError(f"{where} lacks column(s) {', '.join(missing)} "
                        f"(has: {', '.join(sorted(rows[0][1]))})")
    for line, row in rows:
        for c in columns:
            if not isinstance(row.get(c), str) or not row[c].strip():
                raise UserError(f"{where} line {line}: '{c}' must be a non-empty string")
    return [row for _, row in rows]


def local_file(name):
    """A path for a name that looks like a file (.jsonl suffix or existing), else None (a hub id)."""
    path = Path(name)
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise UserError(f"dataset file {name} does not exist")
        return path
    return None


def hub_rows(name, split):
    if not common.hub_reachable():
        raise UserError(f"dataset '{name}' is not a local file and the hub is unreachable (offline); "
                        "pass a local .jsonl or an embedded dataset (arithmetic, open)")
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        configs = datasets.get_dataset_config_names(name)
        return list(datasets.load_dataset(name, "main" if "main" in configs else None, split=split))
    except Exception as e:  # noqa: BLE001 - any hub failure is one user-facing line
        raise UserError(f"cannot load dataset '{name}' (not a local file; hub unreachable or unknown id: "
                        f"{type(e).__name__}); pass a local .jsonl or an embedded dataset") from None


def text_lines(path):
    """Non-empty lines of a text file, without '#' comment lines."""
    return [l.strip() for l in Path(path).read_text().splitlines() if l.strip() and not l.startswith("#")]


def asset_lines(name):
    return text_lines(common.ASSETS / name)
