"""Start gcp-storage-emulator with its on-disk writes made atomic (tests/conftest.py's `Emulator` runs this file).

The emulator rewrites its metadata file (`.meta`, every bucket and object) in place on each change. A test that
stops it part-way through an upload, to play a storage outage, could catch it mid-write and leave half a JSON file,
which the restarted emulator cannot read (it exits 1). Real GCS never loses its own state, so here each file is
written to a temporary name and renamed into place. Nothing else about the emulator changes.
"""

import os
import sys
from typing import Any

from gcp_storage_emulator import storage
from gcp_storage_emulator.__main__ import main

_write_bytes = storage._FileStore.write_bytes


def _atomic_write_bytes(self: Any, rel: str, content: bytes) -> None:
    if self._use_memory:
        _write_bytes(self, rel, content)
        return
    path = self._disk_path(self._norm(rel))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(content)
    os.replace(tmp, path)


storage._FileStore.write_bytes = _atomic_write_bytes

if __name__ == "__main__":
    sys.exit(main())
