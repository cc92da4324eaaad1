"""The model registry: pushed versions, LATEST, rollback (used by evaluate, export, predict and the fingerprint)."""
