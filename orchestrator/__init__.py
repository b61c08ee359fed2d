"""Everything around the Flow++ model: config, data, Ray, MLflow and the CLI."""
