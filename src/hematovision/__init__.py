"""HematoVision: keep a white-blood-cell classifier alive in a laboratory."""

__version__ = "0.1.0"

# The four classes of the training dataset, in the order of the model's outputs.
CLASSES: tuple[str, ...] = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
