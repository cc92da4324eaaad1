"""kfp-finetune components: a package per pipeline step, plus `core`, the plumbing they share.

Each step package (ingest, backbone, train, evaluate, export, predict, compare; registry for pushed versions) holds
the step's plain function, its CLI subcommand and its KFP component. Steps import `core`; `core` imports no step;
`pipelines/` imports steps; nothing imports back up (tests/unit/test_import_graph.py checks it). This module holds
only the version, so that every package may import it.

Heavy libraries (TensorFlow, Keras, TFDS) are imported inside functions, never at module import time, so that
`kfp-finetune --help` and `kfp-finetune compile` start fast.
"""

__version__ = "0.1.0"
