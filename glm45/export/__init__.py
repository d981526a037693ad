"""Exports of glm45 checkpoints to other runtimes' formats (`gguf.py`: llama.cpp and Ollama)."""
