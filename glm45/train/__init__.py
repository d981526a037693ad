"""Training and fine-tuning of GLM-4.5-architecture models: SFT (full and LoRA), Muon, MoE balancing, MTP.

`glm45.train.trainer` is the loop behind `glm45 train` (settings: `glm45.train.config.TrainConfig`); data,
losses, LoRA, optimizers, balancing and checkpoints each have a module of their own.
"""
