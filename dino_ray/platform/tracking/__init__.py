"""MLflow tracking in three parts: where records live (``store``), the durable call queue (``queue``), the run API
(``runs``). The one place that imports mlflow."""
