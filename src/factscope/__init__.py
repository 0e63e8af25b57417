"""factscope: see how transformer language models recall facts."""

__version__ = "0.1.0"
DEFAULT_MODEL = "gemma-3-270m"  # every command's default --model (here so the CLI need not import torch)

from factscope.errors import FactscopeError  # noqa: E402

__all__ = ["DEFAULT_MODEL", "FactscopeError", "__version__"]
