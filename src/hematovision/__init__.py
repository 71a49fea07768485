"""HematoVision: keep a white-blood-cell classifier alive in a laboratory.

The package is laid out by lifecycle step (``docs/architecture.md`` has the map): ``data`` ->
``model`` -> ``training`` -> ``registry`` -> ``serving`` -> ``api`` -> ``lab`` -> ``monitoring``,
with ``settings`` (where everything is), ``params`` (how models are made) and ``stores`` (the one
place each store is opened) at the top.

Heavy third-party libraries (TensorFlow/Keras, MLflow, Evidently, Prefect) are imported inside the
functions that use them, never at a module's top: importing them costs seconds, and the CLI, the
web pages and the unit tests must not pay for what they do not use. Everything else, the project's
own modules included, is imported at the top of each file.
"""

from hematovision.settings import quiet_environment

__version__ = "0.1.0"

# The four classes of the training dataset, in the order of the model's outputs.
CLASSES: tuple[str, ...] = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")

# Telemetry off and tool homes inside the project, before any tool is imported by whoever imports
# the platform first (a flow, the service, the CLI, a test).
quiet_environment()
