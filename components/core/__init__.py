"""The plumbing the steps share: errors, settings (the one module that reads the environment), storage (gcs,
fsutil, safefiles), images (imagecheck), datasets and models (dataset, modelio, layers), and compat: every patch of a
private Keras/KFP/Beam internal. Imports no step package.

Importing it puts `kfp.dsl.component` back inside a running KFP component (compat.kfp_component_decorator_at_runtime):
every step module imports `core` before it defines its components.
"""

from kfp_finetune.components.core import compat, settings

if settings.kfp_runtime():
    compat.kfp_component_decorator_at_runtime()
