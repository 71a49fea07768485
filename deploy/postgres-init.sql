-- One server, one database per tool: MLflow's and Prefect's run their own migrations, the platform's
-- (accounts, corrections, audit, prediction log, monitoring state) runs `hematovision db upgrade`'s.
CREATE DATABASE mlflow OWNER hematovision;
CREATE DATABASE prefect OWNER hematovision;
CREATE DATABASE hematovision OWNER hematovision;
