"""Training and fine-tuning of GLM-4.5-architecture models: SFT and DPO (full and LoRA), GRPO, Muon, MoE balancing, MTP.

`glm45.train.trainer` is the loop behind `glm45 train` (settings: `glm45.train.config.TrainConfig`) and `glm45.train.rl`
the one behind `glm45 rl` (`rl_config.RLConfig`); both run on a `session.TrainingSession` (model, LoRA, FSDP2 or data
parallelism, optimizer, balancing, checkpoints). Data, losses, LoRA, optimizers, balancing and checkpoints each have
a module of their own.
"""
