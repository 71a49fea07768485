# The tracking server: the pinned MLflow with a PostgreSQL driver.
#   docker build -f deploy/mlflow.Dockerfile -t hematovision-mlflow:latest deploy
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "psycopg[binary]>=3.2"
