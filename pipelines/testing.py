"""Run kfp-finetune's components (or your own pipelines built from them) locally inside your own tests.

`local_kfp()` is a context manager that sets up `kfp.local` with a temporary pipeline root, runs components as
subprocesses of this very interpreter (`SubprocessRunner(use_venv=False)`: no pip installs, no Docker), and puts
the previous kfp.local configuration back afterwards. `kfp_local` is the same as a pytest fixture.

The fixture needs no setup: installing kfp-finetune registers this module as a pytest plugin (the `pytest11` entry
point `kfp_finetune.pipelines.testing`), so any test can ask for `kfp_local`. With plugin autoloading off
(PYTEST_DISABLE_PLUGIN_AUTOLOAD=1), load it with `pytest -p kfp_finetune.pipelines.testing` or `pytest_plugins =
["kfp_finetune.pipelines.testing"]` in your top-level conftest.py. (Before 0.1.0 installed it under the generic name
`pipelines.testing`; a conftest that still names that fails to import it: use the new name. Before the entry point
had the module's name, that conftest line failed with "Plugin already registered under a different name".)
"""

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def local_kfp(pipeline_root: str | Path | None = None, *, enable_caching: bool = False) -> Iterator[Path]:
    """Set up kfp.local with a temporary pipeline root (or `pipeline_root`); yields the root.

    A step that fails raises RuntimeError naming it. Example (`image_folder` holds one sub-folder of images per
    class):

    >>> from kfp_finetune.components.ingest.step import ingest_op
    >>> from kfp_finetune.pipelines.testing import local_kfp
    >>> with local_kfp():
    ...     task = ingest_op(source=str(image_folder), seed=1)
    >>> sorted(task.outputs["dataset"].metadata["class_names"])
    ['circle', 'square', 'stripes']
    """
    from kfp.local import config as local_config

    from kfp_finetune.pipelines._kfp_local import init_local

    previous = local_config.LocalExecutionConfig.instance
    with contextlib.ExitStack() as stack:
        if pipeline_root is None:
            pipeline_root = stack.enter_context(tempfile.TemporaryDirectory(prefix="kfp-local-"))
        root = Path(pipeline_root)
        root.mkdir(parents=True, exist_ok=True)
        init_local(str(root), enable_caching=enable_caching)
        try:
            yield root
        finally:
            local_config.LocalExecutionConfig.instance = previous


try:
    import pytest
except ImportError:  # pragma: no cover (pytest is only needed for the fixture)
    pytest = None

if pytest is not None:

    @pytest.fixture
    def kfp_local(tmp_path: Path) -> Iterator[Path]:
        """kfp.local set up for this test, with its pipeline root under the test's tmp_path (yielded)."""
        with local_kfp(tmp_path / "pipeline_root") as root:
            yield root
