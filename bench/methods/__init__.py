"""Training recipes: one module (and YAML presets) per method."""
