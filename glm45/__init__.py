"""glm45: a complete, fast, readable Python stack for the GLM-4.5 family of models."""

__version__ = "0.1.0"
