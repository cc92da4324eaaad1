"""The real steps (ingest -> backbone -> train_head) feeding the evaluate/export tests, each built once per session.

The backbone is the authentic MobileNet v1 alpha 0.25 with ImageNet weights from the shared mirror at 96 px, so a
few head epochs on cached features give a strong model in seconds. A deliberately weak model (one head epoch on a
random-init backbone) and a model trained on other classes come from the very same steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

from tests import imagegen

IMAGE_SIZE = 96


class Chain:
    """Lazily built artifacts under `root`; every property runs its step the first time it is asked for."""

    def __init__(self, root: Path, synthetic_folder: Path, weights_mirror: Path) -> None:
        self.root, self._given_folder, self.weights_mirror = root, synthetic_folder, weights_mirror
        self._built: dict[str, Path] = {}
        self._results: dict[str, object] = {}

    @property
    def synthetic_folder(self) -> Path:
        """The images the chain's datasets are ingested from (reports and datasets name this folder): a copy of the
        first asking worker's `synthetic_folder` (the same files in every worker), shared like every artifact."""
        return self._once("synthetic", lambda out: shutil.copytree(self._given_folder, out))

    def _once(self, name: str, make) -> Path:  # noqa: ANN001
        """Build `name` once per test run: the pytest-xdist workers of one run share `root`, so the first worker to
        ask builds under a lock while another asking waits, then reads it (each used to build its own copy)."""
        if name not in self._built:
            target, done = self.root / name, self.root / f"{name}.done"
            with _locked(self.root / f"{name}.lock"):
                if not done.exists():
                    if target.exists():  # left half-built by a worker whose build failed
                        shutil.rmtree(target)
                    make(target)
                    done.touch()
            self._built[name] = target
        return self._built[name]

    @property
    def dataset(self) -> Path:
        """circle / square / stripes: 90 images, 30% test."""
        from kfp_finetune.components.ingest.step import IngestConfig, ingest

        return self._once("dataset", lambda out: ingest(IngestConfig(
            source=str(self.synthetic_folder), output=str(out), val_fraction=0.2, test_fraction=0.3, seed=0)))

    @property
    def no_test_dataset(self) -> Path:
        """The same images with an empty test split."""
        from kfp_finetune.components.ingest.step import IngestConfig, ingest

        return self._once("no_test_dataset", lambda out: ingest(IngestConfig(
            source=str(self.synthetic_folder), output=str(out), val_fraction=0.2, test_fraction=0.0, seed=0)))

    @property
    def other_dataset(self) -> Path:
        """circle / square / checker: other class names."""
        from kfp_finetune.components.ingest.step import IngestConfig, ingest

        def make(out: Path) -> None:
            src = self.root / "other_images"
            imagegen.write_class_folder(src, classes=("circle", "square", "checker"), per_class=12, size=64, seed=1)
            ingest(IngestConfig(source=str(src), output=str(out), val_fraction=0.25, test_fraction=0.25))

        return self._once("other_dataset", make)

    @property
    def noisy_dataset(self) -> Path:
        """The synthetic images with every 4th image of each class filed under the next class (25 % label noise):
        no model gets its validation split all right, so a temperature has something to fit."""
        import shutil

        from kfp_finetune.components.ingest.step import IngestConfig, ingest

        def make(out: Path) -> None:
            src = self.root / "noisy_images"
            classes = sorted(p.name for p in self.synthetic_folder.iterdir() if p.is_dir())
            for i, cls in enumerate(classes):
                for j, f in enumerate(sorted((self.synthetic_folder / cls).iterdir())):
                    target = src / (classes[(i + 1) % len(classes)] if j % 4 == 3 else cls)
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy(f, target / f"{cls}_{f.name}")
            ingest(IngestConfig(source=str(src), output=str(out), val_fraction=0.3, test_fraction=0.3, seed=0))

        return self._once("noisy_dataset", make)

    @property
    def backbone(self) -> Path:
        from kfp_finetune.components.backbone.step import BackboneConfig, build_backbone

        def make(out: Path) -> None:
            old = os.environ.get("KFP_FINETUNE_WEIGHTS_MIRROR")
            os.environ["KFP_FINETUNE_WEIGHTS_MIRROR"] = str(self.weights_mirror)
            try:
                build_backbone(BackboneConfig(name="mobilenet", alpha=0.25, image_size=IMAGE_SIZE, output=str(out)))
            finally:
                if old is None:
                    os.environ.pop("KFP_FINETUNE_WEIGHTS_MIRROR", None)
                else:
                    os.environ["KFP_FINETUNE_WEIGHTS_MIRROR"] = old

        return self._once("backbone", make)

    @property
    def random_backbone(self) -> Path:
        """The same architecture with random init (weights=none): features that carry little about the classes."""
        from kfp_finetune.components.backbone.step import BackboneConfig, build_backbone

        return self._once("random_backbone", lambda out: build_backbone(BackboneConfig(
            name="mobilenet", alpha=0.25, image_size=IMAGE_SIZE, weights="none", output=str(out))))

    def _head(self, name: str, dataset: Path, epochs: int, learning_rate: float, backbone: Path | None = None) -> Path:
        from kfp_finetune.components.train import HeadConfig, train_head

        backbone = backbone or self.backbone
        return self._once(name, lambda out: train_head(HeadConfig(
            dataset=str(dataset), backbone=str(backbone), output=str(out), epochs=epochs,
            learning_rate=learning_rate, augment=False, batch_size=16, seed=0)))

    @property
    def strong(self) -> Path:
        """6 head epochs at lr 1e-2: (near) perfect on the test split."""
        return self._head("strong", self.dataset, 6, 1e-2)

    @property
    def weak(self) -> Path:
        """1 head epoch on a random-init backbone: well below the strong model (about 0.4 on 3 classes).

        (A head that barely moves is no longer weak: the head starts at zero, so even a 1e-7 step points every logit
        the right way and argmax is perfect on this easy data.)"""
        return self._head("weak", self.dataset, 1, 1e-3, backbone=self.random_backbone)

    @property
    def noisy(self) -> Path:
        """6 head epochs at lr 1e-2 on noisy_dataset, with the default label smoothing (0.1)."""
        return self._head("noisy", self.noisy_dataset, 6, 1e-2)

    @property
    def other_model(self) -> Path:
        """Trained on other_dataset (other class names)."""
        return self._head("other_model", self.other_dataset, 1, 1e-3)


    @property
    def blessed_eval(self) -> Path:
        """The strong model's evaluation on the test split, blessed with min_accuracy 0.8."""
        from kfp_finetune.components.evaluate.step import EvaluateConfig, evaluate

        def make(out: Path) -> None:
            assert evaluate(EvaluateConfig(dataset=str(self.dataset), model=str(self.strong), output=str(out),
                                           min_accuracy=0.8)).blessed

        return self._once("blessed_eval", make)

    # What `pushed` gives export (test_export's push test checks version.json against it).
    PUSH = {"run_id": "v1", "fingerprint": "abc123", "settings": {"head_epochs": "6.0"}, "pipeline_job": "job-7"}

    @property
    def pushed(self):  # noqa: ANN201
        """(ExportResult, export folder, registry): the strong model exported with both LiteRT models (serving check,
        conversions) and pushed as version v1 of a local registry. One export (~25 s) read by the export, serving
        and tflite tests; read-only: a test that pushes again copies the registry first."""
        from kfp_finetune.components.export.step import ExportConfig, export

        def make(out: Path) -> None:
            result = export(ExportConfig(
                model=str(self.strong), output=str(out / "export"), evaluation=str(self.blessed_eval), tflite="both",
                push_to=str(out / "registry"), **self.PUSH))
            (out / "result.pickle").write_bytes(pickle.dumps(result))  # for the workers that did not build it

        root = self._once("pushed", make)
        if "pushed" not in self._results:
            self._results["pushed"] = pickle.loads((root / "result.pickle").read_bytes())
        return self._results["pushed"], root / "export", root / "registry"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_CHAINS: dict[str, Chain] = {}


def get(tmp_path_factory, synthetic_folder: Path, weights_mirror: Path) -> Chain:  # noqa: ANN001
    """One Chain per test run, shared by every module that asks and, under pytest-xdist, by every worker: its root
    is then in the run's base folder (the parent of each worker's), named after the run's id."""
    if "chain" not in _CHAINS:
        run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
        if run_id:
            root = tmp_path_factory.getbasetemp().parent / f"evalchain-{run_id}"
            root.mkdir(exist_ok=True)
        else:
            root = tmp_path_factory.mktemp("evalchain")
        _CHAINS["chain"] = Chain(root, synthetic_folder, weights_mirror)
    return _CHAINS["chain"]
