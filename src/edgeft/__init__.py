"""edgeft: fine-tune an image classifier, export it, prove the export, ship it to the edge."""

__version__ = "0.1.0"

__all__ = ["__version__"]
