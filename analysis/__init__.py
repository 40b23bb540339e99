"""Analysis of fedselect runs: tables and figures from run records and MLflow."""
