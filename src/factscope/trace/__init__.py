"""Causal tracing (Meng et al. 2022): which hidden states, MLPs and attention outputs carry a fact.

``core``: the computation (``trace`` fast path, ``naive_trace`` reference); ``run``: the resumable
per-fact loop, tables, figures, summary and report section; ``cli``: ``factscope trace``. From
Python: ``factscope.trace.run(model, facts)`` returns a :class:`factscope.notebook.Result`.
"""


from factscope.notebook import lazy_submodules

__getattr__ = lazy_submodules(__name__, ("run",))
