"""The evaluate step: metrics, calibration, the HTML report and the go/no-go (blessing)."""
