"""The export step: a SavedModel serving encoded images, checked, optionally LiteRT and Vertex AI Model Registry,
pushed as a new version.
"""
