"""parallax_lightning: the Lightning + MLflow experiment platform for Parallax models."""
