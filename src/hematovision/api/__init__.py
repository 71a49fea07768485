"""The service over HTTP (BentoML): the request guard, who may do what, the one error shape, and the
route modules for predictions, the lab, models and operations."""
