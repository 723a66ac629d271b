"""Quill pipelines: data, stages, CLI and evaluation around the Quill model."""
