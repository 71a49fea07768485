"""Watching the champion's predictions: reference profiles and Evidently drift checks, windows,
alerts and the retraining trigger."""
