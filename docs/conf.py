"""Sphinx configuration of the persona_jax docs (MyST markdown pages + an API reference
generated from the docstrings). Built by `.ci/run` with warnings as errors:

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "persona_jax"
author = "persona_jax developers"
extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]
html_theme = "alabaster"
html_title = "persona_jax"
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# The package's docstrings are plain text with shapes like [B, T, D] and *args, not
# reStructuredText: show each one verbatim instead of parsing it as markup.


def _docstring_verbatim(app, what, name, obj, options, lines):
    if not any(line.strip() for line in lines):
        return
    body = ["    " + line if line.strip() else "" for line in lines]
    lines[:] = ["::", ""] + body + [""]


def setup(app):
    app.connect("autodoc-process-docstring", _docstring_verbatim)
