"""Fast-SCNN (Poudel et al. 2019) for semantic segmentation, in JAX/Flax linen."""
