"""The data checks' step: drift of this run's data profile against the champion's (a step of its own between ingest
and training), and the parameters of every data check (params.py: leakage, data_drift and the drift thresholds)."""
