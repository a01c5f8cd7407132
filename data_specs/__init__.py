"""Bundled data specs (YAML). `pipeline.spec.load_spec('demo')` finds them by name."""
