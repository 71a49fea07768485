-- One server, one database per tool (the lab's own tables follow when the platform's stores move to PostgreSQL).
CREATE DATABASE mlflow OWNER hematovision;
CREATE DATABASE prefect OWNER hematovision;
