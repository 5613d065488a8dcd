-- Run once by the postgres image on a new volume, as POSTGRES_USER (mlflow): the database
-- of MLflow's basic-auth users and permissions, beside the tracking store `mlflow`.
CREATE DATABASE mlflow_auth OWNER mlflow;
