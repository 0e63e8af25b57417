"""Knowledge circuits (Yao et al. 2024): the computation graph, masked forwards, edge attribution.

``Graph`` (graph.py), ``run_masked`` (patching.py) and ``attribute`` (attribute.py); see
docs/circuits.md.
"""

from factscope.circuits.graph import Graph
from factscope.circuits.patching import run_masked
from factscope.circuits.attribute import attribute  # (binds the function over the submodule's name)

__all__ = ["Graph", "run_masked", "attribute"]
