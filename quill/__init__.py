"""Quill: train a small language model end to end on the Hugging Face stack (see README.md)."""
