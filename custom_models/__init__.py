"""Model code for Quill. Importing `custom_models.quill` registers Quill with transformers' Auto classes."""
