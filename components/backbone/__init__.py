"""The backbone step: a keras.applications backbone with ImageNet weights, as a Model artifact."""
