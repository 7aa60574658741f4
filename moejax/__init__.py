"""moejax: Mixture-of-Experts transformers in JAX/Flax NNX with expert parallelism."""

__version__ = "0.1.0"
