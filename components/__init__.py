"""kfp-finetune components: one plain function per pipeline step, plus its CLI and KFP doors.

Heavy libraries (TensorFlow, Keras, TFDS) are imported inside functions, never at module import time, so that
`kfp-finetune --help` and `kfp-finetune compile` start fast.
"""

__version__ = "0.1.0"
