"""Integrations with the tools users already run beside a search: optuna-dashboard (dashboard.py) and MLflow
(mlflow.py). Each is optional and imports its package only when used."""
