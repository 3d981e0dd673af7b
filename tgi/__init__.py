"""tgi: a Text Generation Inference compatible server built on hardware plugins."""

__version__ = "0.1.0"

__all__ = ["__version__"]
