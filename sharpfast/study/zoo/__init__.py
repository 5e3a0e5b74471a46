"""The built-in model zoo: small MLPs, CNNs and ViTs trained on scikit-learn digits over a grid of
hyperparameters (architecture, learning rate, batch size, width, weight decay, augmentation,
optimizer, and SAM's radius: ``sam_rho``).

Every model is saved as safetensors, with its initial weights beside it (``init_checkpoint``, for
distance-to-initialization measures), and a manifest entry (``checkpoints``)
holding its factory, hyperparameters, train/test error and loss, its error on digits-C and facts
of its training trajectory (``train_steps``; ``steps_to_loss_0.1``, the first epoch end at which
the full training loss was <= 0.1, counted in steps; absent where it never was).
Training is deterministic: the seed fixes the initialization and the batch order, and each
model is trained with one intra-op thread.

The package: ``architectures`` (the models and the factories manifests name), ``grid`` (the
factorial grids and presets), ``training`` (one model or a stack, and ``build_zoo``), ``digits``
(the data), ``checkpoints`` (manifests and safetensors checkpoints), ``table`` (manifests from a
user's table of models) and ``hf`` (Hugging Face ``save_pretrained`` folders).
"""
from .architectures import ARCHS, ViT, build, cnn, mlp, model_kwargs, vit
from .grid import BASE_LR, DEFAULT_TRAIN, OPTIONAL_TRAIN, ZOO_PRESETS, ZooSpec, config_id
from .training import (SMALL_LOSS, STACK_FACTORS, ZOO_STACK, build_zoo, data_spec, evaluate, initialized, stack_key,
                       stacks_of, train, train_stack)

__all__ = ["ARCHS", "ViT", "build", "cnn", "mlp", "model_kwargs", "vit", "BASE_LR", "DEFAULT_TRAIN", "OPTIONAL_TRAIN", "ZOO_PRESETS",
           "ZooSpec", "config_id", "SMALL_LOSS", "STACK_FACTORS", "ZOO_STACK", "build_zoo", "data_spec", "evaluate",
           "initialized", "stack_key", "stacks_of", "train", "train_stack"]
