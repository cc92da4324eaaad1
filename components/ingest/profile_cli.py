"""`kfp-finetune profile --source SRC`: the data profile of a folder, gs:// prefix or CSV manifest, without ingesting.

The same listing, decode check, content-hash splits and leakage decision as `kfp-finetune ingest` with the same
options (`step.profile_source`), so the profile printed is the one ingest would write as data_profile.json. Prints
the profile's JSON on stdout (or writes it with --output), a summary line on stderr, and with --html a
self-contained page with the report's data section.
"""

import argparse
import logging
import sys
from pathlib import Path

from kfp_finetune.components.ingest.params import LEAKAGE
from kfp_finetune.components.train.params import add_arguments

log = logging.getLogger("kfp_finetune.profile")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile", help="print the data profile of a source (folder, gs://, CSV manifest) without ingesting",
        description="Decode every image of SRC once and print its data profile (class shares, size, format, colour "
                    "mode, brightness and contrast histograms per split, near-duplicates across splits) as JSON: "
                    "the data_profile.json that `ingest` with the same options would write. Nothing is written "
                    "unless --output / --html say where.")
    p.add_argument("--source", required=True, metavar="SRC", help="folder, gs://bucket/prefix or .csv manifest")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="validation share (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1, metavar="F", help="test share (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="the split seed (default 0)")
    p.add_argument("--max-side", type=int, default=None, metavar="N", help="as ingest's --max-side")
    add_arguments(p, [LEAKAGE])
    p.add_argument("--output", default=None, metavar="FILE", help="write the profile JSON here instead of stdout")
    p.add_argument("--html", default=None, metavar="FILE", help="also write a page with the report's data section")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from kfp_finetune.components.dataprofile import LeakageResult
    from kfp_finetune.components.dataprofile.reporthtml import html_section, page
    from kfp_finetune.components.ingest.step import IngestConfig, profile_source

    scratch = os.path.join(tempfile.gettempdir(), "kfp-finetune-profile-unused")
    config = IngestConfig(source=args.source, output=scratch, val_fraction=args.val_fraction,
                          test_fraction=args.test_fraction, seed=args.seed, max_side=args.max_side,
                          leakage=args.leakage)
    profile, report = profile_source(config)
    overall = profile.overall()
    leak = report["leakage"]
    log.info("%s: %d images, %d classes; median short side %.0f px; formats %s; modes %s; %d near-duplicate "
             "pair(s) across splits (%s)", args.source, profile.count, len(overall.classes),
             overall.quantile("short_side", 0.5)[0], dict(overall.categories["format"]),
             dict(overall.categories["mode"]), leak["cross_split_pairs"], leak["policy"])
    for target in (args.output, args.html):
        if target:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
    if args.output:
        _write_text(Path(args.output), profile.dumps())  # byte for byte what ingest writes
    else:
        sys.stdout.write(profile.dumps())
    if args.html:
        def image(record_id: str) -> bytes | None:
            names = {p["a"]["id"]: p["a"]["name"] for p in leak["pairs"]}
            names.update({p["b"]["id"]: p["b"]["name"] for p in leak["pairs"]})
            path = Path(names.get(record_id, ""))
            return path.read_bytes() if names.get(record_id) and path.is_file() else None

        _write_text(Path(args.html), page(html_section(profile, None, LeakageResult.from_json(leak), image)))
    return 0


def _write_text(path: Path, text: str) -> None:
    """Atomically: a hidden temporary file beside `path`, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
