"""Knowledge circuits (Yao et al. 2024): the computation graph, masked forwards, edge attribution.

``Graph`` (graph.py), ``run_masked`` (patching.py) and ``attribute`` (attribute.py); see
docs/circuits.md.

From Python, the ``circuit`` commands are one call each, returning a
:class:`factscope.notebook.Result`: ``factscope.circuits.discover(model, dataset, method="eap-ig")``,
``factscope.circuits.evaluate(model, dataset)``, ``factscope.circuits.lens(model, dataset)``,
``factscope.circuits.roles(model, dataset)``, ``factscope.circuits.hallucination(model, dataset)`` and
``factscope.circuits.icl(model, dataset)`` (the modules evaluate.py, lens.py and roles.py are callable).
"""

from factscope.circuits.graph import Graph
from factscope.circuits.patching import run_masked
from factscope.circuits.attribute import attribute  # (binds the function over the submodule's name)
from factscope.circuits import evaluate, lens, roles  # callable modules (factscope.notebook.callable_module)
from factscope.circuits.run import analyse_discover as discover
from factscope.circuits.run import analyse_hallucination as hallucination
from factscope.circuits.run import analyse_icl as icl

__all__ = ["Graph", "run_masked", "attribute", "discover", "evaluate", "lens", "roles", "hallucination", "icl"]
