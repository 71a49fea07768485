"""Where models live: the MLflow tracking set-up, the pyfunc packaging, the registry with its
``champion`` alias, and the promotion gate."""
