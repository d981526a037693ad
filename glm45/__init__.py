"""glm45: a complete, fast, readable Python stack for the GLM-4.5 family of models."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from glm45 import LLM, SamplingParams, LoRARequest` without importing torch for `import glm45`.
    if name in ("LLM", "SamplingParams", "LoRARequest"):
        from glm45 import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'glm45' has no attribute {name!r}")
