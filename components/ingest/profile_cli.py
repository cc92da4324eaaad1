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

from kfp_finetune.components.core.fsutil import write_text
from kfp_finetune.components.core.params import add_arguments, config_kwargs
from kfp_finetune.components.ingest.params import INGEST

# ingest's parameters that decide the profile (its splits and leakage moves), defined in components/ingest/params.py
PROFILE_PARAMS = tuple(p for p in INGEST if p.name in ("source", "val_fraction", "test_fraction", "seed", "max_side",
                                                      "leakage"))

log = logging.getLogger("kfp_finetune.profile")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile", help="print the data profile of a source (folder, gs://, CSV manifest) without ingesting",
        description="Decode every image of SRC once and print its data profile (class shares, size, format, colour "
                    "mode, brightness and contrast histograms per split, near-duplicates across splits) as JSON: "
                    "the data_profile.json that `ingest` with the same options would write. Nothing is written "
                    "unless --output / --html say where.")
    add_arguments(p, PROFILE_PARAMS)
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
    config = IngestConfig(output=scratch, **config_kwargs(PROFILE_PARAMS, args))
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
        write_text(args.output, profile.dumps())  # byte for byte what ingest writes
    else:
        sys.stdout.write(profile.dumps())
    if args.html:
        names = {pair[side]["id"]: pair[side]["name"] for pair in leak["pairs"] for side in ("a", "b")}

        def image(record_id: str) -> bytes | None:
            path = Path(names.get(record_id) or "")
            return path.read_bytes() if names.get(record_id) and path.is_file() else None

        write_text(args.html, page(html_section(profile, None, LeakageResult.from_json(leak), image)))
    return 0
