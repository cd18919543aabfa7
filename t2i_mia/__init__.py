"""t2i-mia: membership inference audits of text-to-image models, natively in JAX/Flax."""

__version__ = "0.1.0"
