"""The ingest and fingerprint parameters, each defined once (`components.core.params.Param`).

`IngestConfig` takes its defaults from here, the `ingest` / `fingerprint` CLI options and the pipeline's parameters
are held to them by tests/unit/test_step_parameters.py, and `Param.training` says which pipeline parameters are
training settings (a different split is a different model; where the data comes from is not: the fingerprint of
the data is compared instead).

No TensorFlow here: the pipeline imports this module at compile time.
"""

from kfp_finetune.components.core.params import Param, fraction, int_at_least, ratio
from kfp_finetune.components.dataprofile.leakage import POLICIES as LEAKAGE_POLICIES

SOURCE = Param("source", str, None,
               "the images: a class-per-folder directory (local or gs://), a CSV manifest (path,label), or "
               "tfds:NAME[:VERSION]", required=True, recipe=False, pipeline="source", training=False)
SEED = Param("seed", int, 0, "changes which images land in which split (and seeds training)", int_at_least(0),
             "an integer ≥ 0", recipe=False, pipeline="seed")

# Shapes the splits, so a training setting (like val_fraction): changing it retrains.
LEAKAGE = Param(
    "leakage", str, "move",
    "near-duplicates (perceptual hash within 10 bits) in different splits: move (each group into one split, the "
    "first of train > validation > test holding a member) or report (splits unchanged); both list the pairs in "
    "ingest_report.json", choices=LEAKAGE_POLICIES, recipe=False, pipeline="leakage")

INGEST: tuple[Param, ...] = (
    SOURCE,
    Param("val_fraction", float, 0.1, "share of the images held out for validation (stable, content-hashed split)",
          fraction, "a number in [0, 1)", recipe=False, pipeline="val_fraction"),
    Param("test_fraction", float, 0.1, "share of the images held out for the final test",
          fraction, "a number in [0, 1)", recipe=False, pipeline="test_fraction"),
    SEED,
    Param("max_side", int, None, "downscale images whose longer side exceeds this many pixels (unset: keep the "
          "bytes unchanged)", int_at_least(1), "a positive number of pixels", optional=True, recipe=False,
          pipeline="max_side"),
    Param("max_corrupt_fraction", float, 0.01, "fail when more than this share of image files is unusable",
          ratio, "a number in [0, 1]", recipe=False, training=False),
    Param("num_shards", int, None, "TFRecord shards per split (unset: about 64 MiB each)", int_at_least(1),
          "a positive integer or 'auto'", optional=True, recipe=False, training=False),
    LEAKAGE,
)

FINGERPRINT: tuple[Param, ...] = (
    SOURCE,
    Param("push_to", str, None, "the push destination whose LATEST is the champion to compare with",
          optional=True, recipe=False, pipeline="push_to", training=False),
    Param("force_retrain", bool, False, "train even when the data and the training settings equal the champion's",
          recipe=False, pipeline="force_retrain", training=False),
)
