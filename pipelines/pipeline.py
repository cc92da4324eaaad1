"""The `@dsl.pipeline` that chains the steps: ingest ∥ backbone → train_head → fine_tune → evaluate → (blessed) export.

The pipeline is built by a factory because a few choices are fixed at compile time, not run time: the container
image, an optional GPU for the training steps, optional Vertex AI custom-job wrapping of the training steps, and the
demo-only weights fallback. `build_pipeline(CompileOptions())` gives the production pipeline; `compile_pipeline`
writes it as IR YAML.

Everything heavy (TensorFlow, Keras) stays inside the components, so building and compiling takes about a second.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as real types.
import copy
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from kfp_finetune.components.core import settings
from kfp_finetune.components.core.errors import UserError
from kfp_finetune.pipelines.params import training_parameters

log = logging.getLogger(__name__)

PIPELINE_NAME = "kfp-finetune"

# Tags that move: a compiled pipeline pointing at one of these runs whatever was pushed last, and KFP's cache key
# (the image string) then serves stale results (kubeflow/pipelines#13862).
MUTABLE_TAGS = frozenset({"latest", "main", "master", "dev", "develop", "nightly", "edge", "stable", "head"})


@dataclass(frozen=True)
class Gpu:
    """A GPU request for the training steps: an accelerator type as KFP/Vertex name it, and a count."""

    type: str
    count: int = 1

    @classmethod
    def parse(cls, spec: str) -> "Gpu":
        """'NVIDIA_TESLA_T4:2' -> Gpu('NVIDIA_TESLA_T4', 2); the count defaults to 1."""
        kind, _, count = spec.partition(":")
        kind = kind.strip()
        if not kind or not re.fullmatch(r"[A-Za-z0-9_.\-/]+", kind):
            raise UserError(f"--gpu {spec!r}: expected TYPE[:COUNT], e.g. NVIDIA_TESLA_T4:1 or nvidia.com/gpu:2")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise UserError(f"--gpu {spec!r}: COUNT must be a whole number, e.g. NVIDIA_TESLA_T4:2") from None
        if n < 1:
            raise UserError(f"--gpu {spec!r}: COUNT must be at least 1")
        return cls(kind, n)


@dataclass(frozen=True)
class CustomJob:
    """Vertex AI custom-job settings for the training steps (google-cloud-pipeline-components wraps them)."""

    machine_type: str = "n1-standard-8"
    accelerator_type: str = ""
    accelerator_count: int = 1
    replica_count: int = 1

    def __post_init__(self) -> None:
        if not self.machine_type:
            raise UserError("--machine-type is empty; give a Vertex machine type such as n1-standard-8")
        if self.replica_count < 1:
            raise UserError(f"--replica-count {self.replica_count}: must be at least 1")
        if self.accelerator_type and self.accelerator_count < 1:
            raise UserError(f"--accelerator-count {self.accelerator_count}: must be at least 1")


@dataclass(frozen=True)
class CompileOptions:
    """Compile-time choices. Validated once here; `build_pipeline` trusts them.

    Args:
        image: the container image of every component (default: this release's versioned image).
        gpu: a GPU for the training steps on KFP (ignored with `custom_job`, which has its own accelerator).
        custom_job: wrap both training steps as Vertex AI custom jobs (machine type, accelerator, replicas).
        cpu: CPU request of each training step (Kubernetes quantity).
        memory: memory request of each training step (Kubernetes quantity).
        retries: how many times a failed training step is retried (fine_tune resumes from its checkpoint).
        demo_fallback: only for the no-argument demo: the backbone falls back to random init when no ImageNet
            weights can be had. Never set for a production pipeline.
        compare_recipes: recipe names (components/compare/recipes.py) to compare: each trains as a parallel branch
            (dsl.ParallelFor), the best on the validation split goes on to test, blessing and export. Empty: off.
    """

    image: str = field(default_factory=settings.component_image)
    gpu: Gpu | None = None
    custom_job: CustomJob | None = None
    cpu: str = "4"
    memory: str = "16G"
    retries: int = 2
    demo_fallback: bool = False
    compare_recipes: tuple[str, ...] | str = ()  # names, or "a,b" / "all" as the CLI takes them
    # --- Dataflow (issue 13): run the ingest step as an Apache Beam job on Dataflow (components/ingest/beam_ingest.py);
    # a components.ingest.beam_ingest.DataflowSettings, validated on construction. None: the local ingest.
    dataflow: Any = None

    def __post_init__(self) -> None:
        if self.compare_recipes:
            from kfp_finetune.components.compare.step import parse_recipe_names

            object.__setattr__(self, "compare_recipes", parse_recipe_names(self.compare_recipes))
        if not self.image or any(c.isspace() for c in self.image):
            raise UserError(f"--image {self.image!r} is not an image reference; e.g. registry.example.com/team/x:1.2.3")
        if self.retries < 0:
            raise UserError(f"--retries {self.retries}: must be 0 or more")
        for name, value in (("--cpu", self.cpu), ("--memory", self.memory)):
            if not re.fullmatch(r"\d+(\.\d+)?(m|[KMGT]i?)?", value):
                raise UserError(f"{name} {value!r} is not a Kubernetes quantity such as 4 or 16G")


def mutable_tag_warning(image: str) -> str | None:
    """A one-line warning when `image` is not pinned to an immutable version or digest, else None."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    if not tag:
        return (f"image {image} has no tag, which means :latest; pin a version (e.g. :{_example_version()}) "
                "or a digest, or cached steps will run stale code")
    if tag.lower() in MUTABLE_TAGS:
        return (f"image {image} uses the mutable tag :{tag}; pin a version or a digest, or KFP's cache (keyed on "
                "the image string) will serve results from older code")
    return None


def _example_version() -> str:
    from kfp_finetune.components import __version__

    return __version__


def _with_image(op: Any, image: str, name: str) -> Any:
    """A copy of a Python component that runs `image` and is named `name` (the task name in the pipeline)."""
    op = copy.deepcopy(op)
    op.component_spec.implementation.container.image = image
    op.component_spec.name = name
    return op


def build_pipeline(options: CompileOptions | None = None) -> Any:
    """The pipeline (a KFP GraphComponent) for the given compile-time options."""
    from kfp import dsl
    from kfp.dsl import HTML, Artifact, Markdown, Metrics, Model, pipeline_channel

    from kfp_finetune.components.backbone.params import BACKBONE
    from kfp_finetune.components.backbone.step import backbone_op
    from kfp_finetune.components.core.params import step_arguments
    from kfp_finetune.components.datacheck.params import DRIFT
    from kfp_finetune.components.datacheck.step import drift_op
    from kfp_finetune.components.evaluate.release_params import EVALUATE, EXPORT
    from kfp_finetune.components.evaluate.step import evaluate_op
    from kfp_finetune.components.export.step import export_op
    from kfp_finetune.components.ingest.fingerprint import STATUS_NO_NEW_DATA, fingerprint_op
    from kfp_finetune.components.ingest.params import FINGERPRINT, INGEST
    from kfp_finetune.components.ingest.step import ingest_op
    from kfp_finetune.components.registry.registry import no_new_data_op
    from kfp_finetune.components.train import fine_tune_op, params, train_head_op

    options = options or CompileOptions()
    fingerprint_c, no_new_data_c, drift_c = (_with_image(op, options.image, name) for op, name in (
        (fingerprint_op, "fingerprint"), (no_new_data_op, "no-new-data"), (drift_op, "data-drift")))
    ingest_c, backbone_c, head_c, tune_c, evaluate_c, export_c = (
        _with_image(op, options.image, name)
        for op, name in ((ingest_op, "ingest"), (backbone_op, "backbone"), (train_head_op, "train-head"),
                         (fine_tune_op, "fine-tune"), (evaluate_op, "evaluate"), (export_op, "export"))
    )
    if options.dataflow is not None:  # --dataflow: the same inputs, run as a Beam job on Dataflow (blocking step)
        import functools

        from kfp_finetune.components.ingest.beam_ingest import ingest_beam_op

        ingest_c = functools.partial(_with_image(ingest_beam_op, options.image, "ingest"), runner="dataflow",
                                     beam_options=options.dataflow.beam_options(options.image))
    if options.custom_job:
        from google_cloud_pipeline_components.v1.custom_job import create_custom_training_job_from_component

        job = options.custom_job

        def wrap(op: Any, display_name: str) -> Any:
            return create_custom_training_job_from_component(
                op, display_name=display_name, machine_type=job.machine_type, accelerator_type=job.accelerator_type,
                accelerator_count=job.accelerator_count if job.accelerator_type else 0, replica_count=job.replica_count)

        head_c = wrap(head_c, "kfp-finetune-train-head")
        tune_c = wrap(tune_c, "kfp-finetune-fine-tune")

    def training_resources(task: Any, display_name: str) -> Any:
        task.set_display_name(display_name)
        task.set_retry(num_retries=options.retries, backoff_duration="60s", backoff_factor=2.0)
        if options.custom_job:  # the custom job's machine spec decides resources
            return task
        task.set_cpu_request(options.cpu).set_memory_request(options.memory)
        if options.gpu:
            task.set_accelerator_type(options.gpu.type).set_accelerator_limit(options.gpu.count)
        return task

    if options.compare_recipes:
        from kfp_finetune.components.compare.step import candidate_op, pick_winner_op, recipe_op

        recipe_c, candidate_c, winner_c, validate_c = (
            _with_image(op, options.image, name)
            for op, name in ((recipe_op, "recipe"), (candidate_op, "candidate"), (pick_winner_op, "pick-winner"),
                             (evaluate_op, "evaluate-validation"))
        )

    def compare_branches(ingest: Any, check: Any, values: dict[str, Any]) -> Any:
        """Compare mode: one branch per recipe (ParallelFor), the winner on validation, then test → export.

        Each branch trains with every setting of its recipe (params.branch_arguments); of the pipeline's training
        parameters only the run's own (batch_size, seed, checkpoints) and the epoch caps apply.
        """
        dataset = ingest.outputs["dataset"]
        v = values
        with dsl.ParallelFor(items=list(options.compare_recipes), name="recipes") as recipe:
            plan = recipe_c(recipe=recipe, weights=v["weights"], image_size=v["image_size"],
                            max_head_epochs=v["head_epochs"], max_fine_tune_epochs=v["fine_tune_epochs"])
            plan.set_display_name("recipe settings").set_caching_options(True)
            s = plan.outputs
            # Per branch, so that a recipe can start from other weights (a Recipe may say none). Branches asking for the
            # same weights get the same inputs, so KFP's cache builds that backbone once.
            branch_backbone = backbone_c(name=v["backbone"], alpha=v["backbone_alpha"], image_size=s["image_size"],
                                         weights=s["weights"], weights_sha256=v["weights_sha256"],
                                         fallback_to_random=options.demo_fallback)
            branch_backbone.set_display_name("backbone").set_caching_options(True)
            head = head_c(dataset=dataset, backbone=branch_backbone.outputs["model"],
                          **params.branch_arguments("train_head", s, v))
            training_resources(head, "train head").after(check)
            tune = tune_c(dataset=dataset, model=head.outputs["model"], **params.branch_arguments("fine_tune", s, v))
            training_resources(tune, "fine-tune")
            validate = validate_c(dataset=dataset, model=tune.outputs["tuned_model"], split="validation")
            validate.set_display_name("evaluate on validation")
            candidate = candidate_c(recipe=recipe, evaluation=validate.outputs["evaluation"])
            candidate.set_display_name("candidate")

        winner = winner_c(candidates=dsl.Collected(candidate.output),
                          models=dsl.Collected(tune.outputs["tuned_model"]))
        winner.set_display_name("pick winner (validation)")
        model = winner.outputs["winner"]

        evaluate, _ = evaluate_and_export(dataset, model, check, v)
        return {"metrics": evaluate.outputs["metrics"], "report": evaluate.outputs["report"],
                "evaluation": evaluate.outputs["evaluation"], "model": model,
                "blessed": evaluate.outputs["blessed"], "accuracy": evaluate.outputs["accuracy"],
                "comparison": winner.outputs["comparison"], "winner_recipe": winner.outputs["recipe"]}

    def evaluate_and_export(dataset: Any, model: Any, check: Any, v: dict[str, Any]) -> tuple[Any, Any]:
        """evaluate on the test split against the champion (push_to/LATEST unless baseline_model says otherwise),
        with the data-drift verdict in its report, then export and push when blessed."""
        evaluate = evaluate_c(dataset=dataset, model=model, split="test", data_drift=check.outputs["result"],
                              **step_arguments(EVALUATE, v))
        evaluate.set_display_name("evaluate")
        with dsl.If(evaluate.outputs["blessed"] == True, name="blessed"):  # noqa: E712 (a KFP condition)
            # No run_id: export then names the pushed version by UTC timestamp (digits), which TF Serving orders.
            export = export_c(model=model, evaluation=evaluate.outputs["evaluation"], fingerprint=v["fingerprint"],
                              training_settings=v["training_settings"],
                              pipeline_job=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, **step_arguments(EXPORT, v))
            # Pushing is a side effect: never satisfy it from the cache.
            export.set_display_name("export").set_caching_options(False)
        return evaluate, export

    def train_and_evaluate(v: dict[str, Any]) -> dict[str, Any]:
        """The tasks of a run with new data (inside the `new-data` condition): the outputs, by name."""
        ingest = ingest_c(fingerprint=v["fingerprint"], **step_arguments(INGEST, v))
        ingest.set_display_name("ingest").set_caching_options(True)
        # The data checks against the champion's data: two small JSON files, before any training. A refused drift
        # fails this task, so no training step starts and nothing is pushed. Never cached: LATEST may have moved.
        check = drift_c(dataset=ingest.outputs["dataset"], push_to=v["push_to"], **step_arguments(DRIFT, v))
        check.set_display_name("data drift").set_caching_options(False)

        if options.compare_recipes:
            return compare_branches(ingest, check, v)

        backbone_task = backbone_c(fallback_to_random=options.demo_fallback, **step_arguments(BACKBONE, v))
        backbone_task.set_display_name("backbone").set_caching_options(True)

        head = head_c(dataset=ingest.outputs["dataset"], backbone=backbone_task.outputs["model"],
                      **step_arguments(params.HEAD, v))
        training_resources(head, "train head").after(check)

        tune = tune_c(dataset=ingest.outputs["dataset"], model=head.outputs["model"],
                      **step_arguments(params.FINE_TUNE, v))
        training_resources(tune, "fine-tune")

        evaluate, _ = evaluate_and_export(ingest.outputs["dataset"], tune.outputs["tuned_model"], check, v)
        return {"metrics": evaluate.outputs["metrics"], "report": evaluate.outputs["report"],
                "evaluation": evaluate.outputs["evaluation"], "model": tune.outputs["tuned_model"],
                "blessed": evaluate.outputs["blessed"], "accuracy": evaluate.outputs["accuracy"]}

    outputs_spec = [("metrics", Metrics), ("report", HTML), ("evaluation", Artifact), ("model", Model),
                    ("blessed", bool), ("accuracy", float), ("status", str)]
    if options.compare_recipes:
        outputs_spec += [("comparison", Markdown), ("winner_recipe", str)]
    PipelineOutputs = NamedTuple("Outputs", outputs_spec)  # noqa: UP014, N806 (KFP needs the functional form)

    @dsl.pipeline(name=PIPELINE_NAME, description="Fine-tune a Keras image classifier by transfer learning.")
    def finetune_pipeline(
        source: str,
        backbone: str = "mobilenet_v2",
        backbone_alpha: float = 0.0,
        image_size: int = 0,
        weights: str = "imagenet",
        weights_sha256: str = "",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_side: int = 0,
        head_epochs: int = 5,
        head_learning_rate: float = 1e-3,
        dropout: float = 0.2,
        fine_tune_epochs: int = 10,
        fine_tune_learning_rate: float = 0.0,
        unfreeze_top: int = 0,
        unfreeze_from: str = "",
        warmup_epochs: int = 1,
        ema_momentum: float = 0.0,
        layer_lr_ratio: float = 1.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        early_stopping_patience: int = 0,
        batch_size: int = 32,
        augment: bool = True,
        augment_strength: float = 0.1,
        label_smoothing: float = 0.1,
        class_weights: str = "auto",
        batch_norm: str = "auto",
        checkpoint_dir: str = "",
        checkpoint_every_steps: int = 0,
        seed: int = 0,
        determinism: str = "data",
        min_accuracy: float = 0.7,
        baseline_model: str = "",
        max_regression: float = 0.0,
        push_to: str = "",
        force_retrain: bool = False,
        class_change: str = "bless",
        max_class_regression: float = 1.0,
        calibrate: bool = True,
        max_ece: float = 1.0,
        tflite: str = "none",
        max_tflite_drop: float = 0.01,
        tflite_required: bool = False,
        leakage: str = "move",
        data_drift: str = "warn",
        drift_max_class_share_change: float = 0.1,
        drift_max_histogram_distance: float = 0.25,
        drift_max_category_distance: float = 0.25,
        drift_min_new_category_share: float = 0.01,
        drift_min_resolution_ratio: float = 0.5,
        drift_min_short_side: int = 32,
        drift_min_images: int = 200,
    ) -> PipelineOutputs:
        """Fine-tune a Keras image classifier: ingest ∥ backbone → train_head → fine_tune → evaluate → export.

        Compiled with --compare-recipes, each recipe's own settings replace the training parameters below (its
        weights choice, learning rates, dropout, augmentation, class weights, label smoothing, unfreezing, BN policy,
        warmup, MixUp/CutMix, patience); head_epochs and fine_tune_epochs then cap each phase, and batch_size,
        seed, checkpoint_dir and checkpoint_every_steps still apply.

        Args:
            source: the images: a class-per-folder directory (local or gs://), a CSV manifest, or a TFDS name.
            backbone: the keras.applications backbone, e.g. mobilenet_v2, mobilenet, efficientnet_b0, resnet50.
            backbone_alpha: MobileNet width multiplier (e.g. 0.25, 0.5, 1.0); 0: the default; others ignore it.
            image_size: square input size in pixels the model is built for (e.g. 160, 224); 0 means the backbone's
                default. Images are resized inside the model, so callers feed any size.
            weights: "imagenet" (resolved from the Keras cache, then KFP_FINETUNE_WEIGHTS_MIRROR, then the public
                URL), or a local path / gs:// URI of a weights file.
            weights_sha256: expected SHA-256 of the weights file; empty uses the known digest when there is one.
            val_fraction: fraction of the images held out for validation (stable, content-hashed split).
            test_fraction: fraction of the images held out for the final test.
            max_side: downscale images whose longer side exceeds this many pixels at ingest; 0 keeps them as is.
            head_epochs: epochs of the first phase, training a new head on the frozen backbone.
            head_learning_rate: Adam learning rate of the head phase.
            dropout: dropout rate before the classification head.
            fine_tune_epochs: maximum epochs of fine-tuning (early stopping may end it sooner); 0 skips it.
            fine_tune_learning_rate: peak learning rate of the fine-tuning phase (AdamW, warm-up then cosine);
                0 means the backbone family's (1e-3 for MobileNet v1, 3e-4 for MobileNetV2, 1e-4 for families
                not measured; components/train/family.py).
            unfreeze_top: how many layers at the top of the backbone to unfreeze; 0 with an empty unfreeze_from
                unfreezes the whole backbone (the default).
            unfreeze_from: alternatively, the name of the first backbone layer to unfreeze (and all above it).
            warmup_epochs: epochs of linear learning-rate warm-up at the start of fine-tuning.
            ema_momentum: fine-tuning keeps a moving average of the weights with this momentum (e.g. 0.99);
                validation, the guard and the model returned use it. 0: off.
            layer_lr_ratio: fine-tuning's first backbone layer trains at this fraction of the peak learning rate, the
                top and the head at the full rate, geometrically between (discriminative rates); 1: one rate.
            mixup_alpha: fine-tuning's MixUp of each training batch with a shuffled copy (λ ~ Beta(α, α)); 0: off.
            cutmix_alpha: fine-tuning's CutMix (a box of the copy pasted; with mixup_alpha, one per batch); 0: off.
            early_stopping_patience: fine-tuning stops after this many epochs without validation improvement
                and keeps the best epoch; 0 (default) runs the cosine schedule to its end.
            batch_size: training batch size of both phases.
            augment: random flips/rotations/zoom during training (Keras preprocessing layers, training only).
            augment_strength: the augmentation's rotation (fraction of a turn), zoom and contrast factor, in (0, 0.5].
            label_smoothing: label smoothing of both training phases (0 = off).
            class_weights: "auto" (balanced weights from the training counts) or "none".
            batch_norm: BatchNormalization policy while fine-tuning: "train" (statistics adapt to the new data),
                "frozen" (keeps the ImageNet statistics, inference mode) or "auto" (the backbone family's: train
                for MobileNet v1, frozen for MobileNetV2 and families not measured; docs/fine-tuning.md).
            checkpoint_dir: folder where train_head and fine_tune keep their training state (every epoch, and on
                SIGTERM) so that a retried attempt resumes mid-epoch (on Vertex a /gcs/... path); empty uses
                AIP_CHECKPOINT_DIR when set (Vertex custom jobs), else no resume. A preempted step exits with
                status 75 (docs/operations.md, Preemption).
            checkpoint_every_steps: with a checkpoint folder, also save the training state every N training steps,
                so that a hard kill loses at most N steps; 0 saves at the end of each epoch (and on SIGTERM) only.
            seed: seed for splitting, shuffling, augmentation and initialisation.
            determinism: reproducible training in both phases: "data" (seeded, ordered input: the same seed and
                data give the same model on a CPU, at no measured cost), "ops" (also TensorFlow's op determinism,
                for GPUs; ~1.7x slower BatchNorm-training epochs on CPU) or "off".
            min_accuracy: the test accuracy a model needs to be blessed (and exported).
            baseline_model: a Model artifact or pushed version (local path or gs:// URI) the new model must not
                fall behind; empty: the champion push_to/LATEST when push_to is set (none yet: thresholds only);
                "none": no comparison.
            max_regression: how much test accuracy below the baseline is still tolerated (e.g. 0.01).
            push_to: where export pushes a versioned copy of the blessed SavedModel (local folder or gs:// prefix);
                empty: the export stays in the pipeline's artifacts only. Checked for writing before any training;
                its LATEST is the champion, and a run whose data and training settings equal the champion's stops
                after the fingerprint step with status "no new data".
            force_retrain: train even when the data and the training settings equal the champion's.
            class_change: when the champion's classes differ from the data's: "bless" (on thresholds alone) or
                "refuse"; the decision and its reason are written to evaluation.json.
            max_class_regression: how far any class's recall may drop against the champion (1 = no such rule).
            calibrate: fit a temperature T on the validation split (minimising NLL); the export serves calibrated
                probabilities softmax(log(p) / T) and keeps the logits as an output.
            max_ece: bless only if the expected calibration error (15 equal-width bins, test split) of the served
                probabilities is at most this (1 = no such rule).
            tflite: also export LiteRT models for phones: "none", "fp16", "int8" (full-integer, uint8 image input)
                or "both", each checked with the LiteRT interpreter on the test split.
            max_tflite_drop: a .tflite whose test accuracy is more than this below the Keras model's is not pushed.
            tflite_required: fail the export (nothing pushed) when a requested .tflite does not convert or pass.
            leakage: near-duplicates (perceptual hash within 10 bits) in different splits: "move" each group into
                one split (the first of train > validation > test holding a member), or "report" only; both list
                the pairs in ingest_report.json. A training setting (it shapes the splits).
            data_drift: the data profile against the champion's (a step before training): "warn" (logged, in the
                report) or "refuse" (the run stops before training with one line saying what moved; nothing is
                pushed). No champion or no stored profile: "no baseline: drift not checked". The thresholds below
                are docs/data-checks.md's; none of these is a training setting.
            drift_max_class_share_change: largest tolerated change of one class's share (0.1 = 10 points).
            drift_max_histogram_distance: largest tolerated total variation distance of a size, file-size,
                brightness or contrast histogram.
            drift_max_category_distance: largest tolerated total variation distance of format / colour mode / tone.
            drift_min_new_category_share: a format or colour mode new to the data is drift from this share.
            drift_min_resolution_ratio: median short side below this fraction of the champion's is a collapse.
            drift_min_short_side: median short side below this many pixels is a collapse whatever the champion.
            drift_min_images: the distribution checks need this many images on both sides.
        """
        values = dict(locals())  # the pipeline's parameters by name, for step_arguments / branch_arguments
        # What the skip decision compares with the champion's: every parameter that shapes the model, as the
        # parameters feeding it declare (Param.training); tests/unit/test_step_parameters.py checks that every
        # pipeline parameter feeds at least one defined parameter.
        training = training_parameters()  # pipelines/params.py
        training_settings = {k: v for k, v in values.items()
                             if isinstance(v, pipeline_channel.PipelineParameterChannel) and k in training}
        training_settings["compare_recipes"] = ",".join(options.compare_recipes)
        fingerprint = fingerprint_c(training_settings=training_settings, **step_arguments(FINGERPRINT, values))
        # Listing the source is the point: never answer it from the cache.
        fingerprint.set_display_name("fingerprint").set_caching_options(False)
        status = fingerprint.outputs["status"]
        values.update(fingerprint=fingerprint.outputs["fingerprint"], training_settings=training_settings)
        with dsl.If(status != STATUS_NO_NEW_DATA, name="new-data"):
            trained = train_and_evaluate(values)
        with dsl.Else(name="no-new-data"):
            skipped = no_new_data_c(push_to=push_to, status=status)
            skipped.set_display_name("no new data: champion kept").set_caching_options(False)
        names = [name for name, _ in outputs_spec if name != "status"]
        return PipelineOutputs(status=status, **{k: dsl.OneOf(trained[k], skipped.outputs[k]) for k in names})

    return finetune_pipeline


def compile_pipeline(output: str | Path, options: CompileOptions | None = None) -> Path:
    """Compile the pipeline to IR YAML at `output` (written atomically); returns the path."""
    return write_compiled(build_pipeline(options or CompileOptions()), output, "pipeline.yaml")


def write_compiled(pipeline: Any, output: str | Path, example: str) -> Path:
    """Compile `pipeline` to IR YAML at `output`, atomically (temp file beside it, then rename); returns the path."""
    import os
    import tempfile

    from kfp import compiler

    output = Path(output)
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; give a file name such as {example}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".yaml", dir=output.parent)
    os.close(fd)
    try:
        compiler.Compiler().compile(pipeline, package_path=tmp)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output
