"""enformer-vep: score genetic variants with a faithful PyTorch port of DeepMind's Enformer."""
__version__ = "0.1.0"

from .errors import EnformerVepError, WeightsError  # noqa: E402
from .model import Enformer, EnformerConfig  # noqa: E402
from .weights import load_model  # noqa: E402

__all__ = ["Enformer", "EnformerConfig", "EnformerVepError", "WeightsError", "load_model", "__version__"]
