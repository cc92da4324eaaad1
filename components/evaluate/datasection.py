"""The report's data section (issue 23): this Dataset's profile against the champion's, the drift verdict, and the
near-duplicate pairs ingest found across splits as thumbnails side by side (dataprofile.reporthtml.html_section).

Everything is optional: a Dataset written before data profiles gives no section; no champion (or one pushed before
profiles) gives the profile without a baseline; no drift result (evaluate run alone) gives no verdict. A thumbnail is
read from the pair's file name (a local path or gs:// URI of the source) and left out when it cannot be read.
"""

import json
import logging
from pathlib import Path
from typing import Any

from kfp_finetune.components.core import gcs
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.components.dataprofile import PROFILE_FILE, DriftResult, LeakageResult, Profile, html_section

log = logging.getLogger("kfp_finetune.evaluate")

MAX_IMAGE_BYTES = 32 << 20


def read_drift(value: str | None) -> DriftResult | None:
    """--data-drift: the drift step's result as JSON text or a drift.json path (or a folder holding one)."""
    if not value or not str(value).strip():
        return None
    text = str(value).strip()
    if not text.startswith("{"):
        path = Path(text) / "drift.json" if Path(text).is_dir() else Path(text)
        if not path.is_file():
            raise UserError(f"--data-drift {value}: not a drift.json file nor the drift step's JSON")
        text = path.read_text(encoding="utf-8")
    try:
        return DriftResult.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--data-drift: not a drift result ({exc})") from None


def _profile_at(folder: str) -> Profile | None:
    try:
        if gcs.is_gcs(folder):
            text = gcs.read_text_if_exists(f"{folder.rstrip('/')}/{PROFILE_FILE}")
        else:
            path = Path(folder) / PROFILE_FILE
            text = path.read_text(encoding="utf-8") if path.is_file() else None
        return Profile.loads(text) if text else None
    except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
        log.warning("data section: %s/%s not usable (%s)", folder, PROFILE_FILE, exc)
        return None


def _image(name: str) -> bytes | None:
    try:
        if gcs.is_gcs(name):
            return gcs.read_bytes(name)
        path = Path(name)
        return path.read_bytes() if path.is_file() and path.stat().st_size <= MAX_IMAGE_BYTES else None
    except Exception:  # noqa: BLE001  (a thumbnail never fails a report)
        return None


def render(dataset: str, ingest_report: dict[str, Any], champion: dict[str, Any], drift: DriftResult | None) -> str:
    """The section's HTML, or '' when the Dataset has no profile."""
    profile = _profile_at(str(dataset))
    if profile is None:
        return ""
    baseline = _profile_at(champion["uri"]) if champion.get("version") and champion.get("uri") else None
    leak_json = ingest_report.get("leakage")
    leak = LeakageResult.from_json(leak_json) if leak_json else None
    names = {}
    for pair in leak.pairs if leak else ():
        names[pair.a_id], names[pair.b_id] = pair.a_name, pair.b_name
    return html_section(profile, baseline, leak, lambda i: _image(names[i]) if i in names else None, drift)
