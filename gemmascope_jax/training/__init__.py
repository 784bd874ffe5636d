"""Training of Gemma Scope 2 dictionaries: losses, schedules, optimizer, the sharded step.

from gemmascope_jax.training import DictionaryTraining, LossConfig, make_train_step
step = make_train_step([DictionaryTraining(cfg, LossConfig(sparsity_coeff=...))], mesh)
state = step.init(seed=0)
state, metrics = step(state, step.put_batch(batch))
"""

from gemmascope_jax.dictionaries.config import DEFAULT_MATRYOSHKA_FRACTIONS, matryoshka_widths
from gemmascope_jax.training.losses import (
    LossConfig,
    dictionary_loss,
    prefix_reconstructions,
)
from gemmascope_jax.training.optimizer import (
    OptimizerConfig,
    constrain_params,
    decoder_norm_axes,
    make_optimizer,
)
from gemmascope_jax.training.schedules import linear_interpolate, linear_warmup, lr_schedule
from gemmascope_jax.training.step import (
    DictionaryTraining,
    TrainState,
    TrainStep,
    make_train_step,
)

__all__ = [
    "DEFAULT_MATRYOSHKA_FRACTIONS",
    "DictionaryTraining",
    "LossConfig",
    "OptimizerConfig",
    "TrainState",
    "TrainStep",
    "constrain_params",
    "decoder_norm_axes",
    "dictionary_loss",
    "linear_interpolate",
    "linear_warmup",
    "lr_schedule",
    "make_optimizer",
    "make_train_step",
    "matryoshka_widths",
    "prefix_reconstructions",
]
