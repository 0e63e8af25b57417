"""Geva et al. 2023, "Dissecting Recall of Factual Associations in Auto-Regressive Language Models".

One module per part of the paper, plain functions and dataclasses on the factscope substrate:

- :mod:`factscope.flow.knockout`   attention knockout (information flow to the last position)
- :mod:`factscope.flow.cli`        ``factscope flow ...``
"""

from __future__ import annotations
