"""predict reads gs:// objects under the same size bound as local files (core.safefiles.MAX_FILE_BYTES): an object
over it is a `too_large` row, and no more than the bound + 1 bytes are ever fetched; one under it is read whole."""

import io

from PIL import Image

from kfp_finetune.components.core import gcs, safefiles
from kfp_finetune.components.predict.inputs import read_item


def _jpeg(side: int) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((side, side), 64).convert("RGB").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_a_gcs_object_over_the_size_bound_is_skipped_as_too_large(gcs_bucket, monkeypatch):
    small, big = _jpeg(16), _jpeg(256)
    assert len(small) < 2000 < len(big)
    gcs_bucket.blob("in/small.jpg").upload_from_string(small)
    gcs_bucket.blob("in/big.jpg").upload_from_string(big)
    monkeypatch.setattr(safefiles, "MAX_FILE_BYTES", 2000)  # the bound, lowered so the test needs no 256 MiB object
    client = gcs.client()

    ok = read_item(f"gs://{gcs_bucket.name}/in/small.jpg", client)
    assert ok.skip_reason is None and ok.data == small
    refused = read_item(f"gs://{gcs_bucket.name}/in/big.jpg", client)
    assert refused.data is None and refused.skip_reason.startswith("too_large")
    assert "2,000-byte limit" in refused.skip_reason
