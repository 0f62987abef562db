-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d), as POSTGRES_USER.
-- One server, three databases: Dagster's instance, MLflow's tracking store, kolm's capture store.
SELECT 'CREATE DATABASE dagster' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'dagster')\gexec
SELECT 'CREATE DATABASE mlflow' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec
SELECT 'CREATE DATABASE kolm' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'kolm')\gexec
