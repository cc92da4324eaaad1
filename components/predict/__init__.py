"""The predict step: batch classification of a folder, gs:// prefix or CSV with a model."""
