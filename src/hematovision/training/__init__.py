"""Making models: training, evaluation and metrics, the main job's steps, and retraining on the
pathologists' corrections."""
