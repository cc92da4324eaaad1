"""kfp-finetune components: one plain function per pipeline step, plus its CLI and KFP doors.

Heavy libraries (TensorFlow, Keras, TFDS) are imported inside functions, never at module import time, so that
`kfp-finetune --help` and `kfp-finetune compile` start fast.
"""

__version__ = "0.1.0"


def _restore_kfp_component_decorator() -> None:
    """KFP runs component bodies with _KFP_RUNTIME=true, which leaves compile-time names (`dsl.component`) out of
    `kfp.dsl`. Our step modules define their components at import time, and component bodies import those very
    modules, so put the decorator back; without this every step fails under kfp.local, KFP and Vertex alike with
    "module 'kfp.dsl' has no attribute 'component'"."""
    from components import settings  # __version__ above is all settings needs from this package

    if not settings.kfp_runtime():
        return
    from kfp import dsl

    if not hasattr(dsl, "component"):
        from kfp.dsl.component_decorator import component

        dsl.component = component


_restore_kfp_component_decorator()
