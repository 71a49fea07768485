"""The classifier: the ImageNet backbone (ported from a PyPI wheel), the head, the embedding cache and
Grad-CAM. One prediction path for training, evaluation, the pyfunc and the service."""
