"""Training and fine-tuning of GLM-4.5-architecture models: SFT (full and LoRA), Muon, MoE balancing, MTP.

See `glm45.train.sft` for the loop behind `glm45 train`, and `glm45.train.recipe_tiny` for the bundled model.
"""
