"""Knowledge editing: ROME and FT-M, CounterFact scores, lens and circuits before/after (docs/editing.md).

From Python: ``factscope.edit.run(model, dataset, method="rome")`` returns a
:class:`factscope.notebook.Result`.
"""

from factscope.notebook import lazy_submodules

__getattr__ = lazy_submodules(__name__, ("run",))
