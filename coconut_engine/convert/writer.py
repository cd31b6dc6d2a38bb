"""Write official-format records atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_records(records: list[dict], path: str | Path) -> Path:
    """Write `records` as an official-format JSON list (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(records, ensure_ascii=False))
    os.replace(tmp, path)
    return path
