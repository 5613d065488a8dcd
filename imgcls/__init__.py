"""imgcls: transfer-learning image classification with a model registry and a REST service."""

__version__ = "0.1.0"
