"""The ingest step: a source (folder, gs://, CSV manifest, TFDS) to a TFDS-format dataset, run locally or as an Apache
Beam job; and the data fingerprint of the operating loop.
"""
