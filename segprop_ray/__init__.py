"""segprop_ray: Segmented Propagation fine-tuning of Hugging Face causal LMs on Ray."""

__version__ = "0.1.0"
