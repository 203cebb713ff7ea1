"""parscale: parallel scaling (ParScale, arXiv 2505.10475) for transformers causal LMs."""
from parscale.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
