"""How the bundled glm45-tiny model is made: synthetic agent data, tokenizer, recipe, evaluation, plots.

Run the modules from `recipes/glm45-tiny` (or with it on PYTHONPATH), e.g. `python -m glm45_tiny.recipe`;
the history of the recipe and its results are in ../README.md.
"""
