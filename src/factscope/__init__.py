"""factscope: see how transformer language models recall facts."""

__version__ = "0.1.0"

from factscope.errors import FactscopeError  # noqa: E402

__all__ = ["FactscopeError", "__version__"]
