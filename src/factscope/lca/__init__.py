"""Latent concept association (Jiang et al. 2024, sec. 4-6): synthetic task, one-layer transformer,
exact constructions and the five experiments.

    from factscope.lca import LCATask, LCAConfig, run_all
    run_all(run)                     # all experiments into a factscope.runs.Run
    run_all(run, quick=True)         # the short demo configuration
    res = factscope.lca.run(quick=True)  # from a notebook: a factscope.notebook.Result
"""

from factscope.lca.experiments import (
    EXPERIMENTS,
    LCAConfig,
    Trainer,
    analyse as run,
    attention_experiment,
    constructed_experiment,
    embeddings_experiment,
    hijack_experiment,
    run_all,
    run_experiments,
    value_matrix_experiment,
)
from factscope.lca.model import ModelConfig, OneLayerTransformer, TrainConfig, evaluate, train
from factscope.lca.task import LCATask, bayes_accuracy, log_posterior, mixed_contexts, posterior
from factscope.lca.theory import (
    constructed_value_matrix,
    inner_product_by_hamming,
    linear_fit,
    principal_angles,
    random_pairing_adjacency,
    theorem1_model,
)

__all__ = [
    "EXPERIMENTS", "LCAConfig", "LCATask", "ModelConfig", "OneLayerTransformer", "TrainConfig", "Trainer",
    "attention_experiment", "bayes_accuracy", "constructed_experiment", "constructed_value_matrix",
    "embeddings_experiment", "evaluate", "hijack_experiment", "inner_product_by_hamming", "linear_fit",
    "log_posterior", "mixed_contexts", "posterior", "principal_angles", "random_pairing_adjacency", "run", "run_all",
    "run_experiments", "theorem1_model", "train", "value_matrix_experiment",
]
