"""The shipped recipes, installed as the data package `quill.recipes` (pyproject maps this folder there).

Read them with `importlib.resources.files("quill.recipes")`, which finds them in a checkout, an editable install and
a wheel alike; a checkout's `recipes/` is also a plain folder that `quill run recipes/tiny` reads directly.
"""
