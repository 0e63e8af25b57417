"""Knowledge circuits (Yao et al. 2024): the computation graph, masked forwards, edge attribution.

``Graph`` (graph.py), ``run_masked`` (patching.py) and ``attribute`` (attribute.py); see
docs/circuits.md.
"""

from factscope.circuits.graph import Graph

__all__ = ["Graph", "run_masked", "attribute"]


def __getattr__(name):  # lazy: patching/attribute import the model substrate
    if name == "run_masked":
        from factscope.circuits.patching import run_masked

        return run_masked
    if name == "attribute":
        from factscope.circuits.attribute import attribute

        return attribute
    raise AttributeError(name)
