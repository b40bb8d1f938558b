"""Deployment: the Predictor (preprocessing + model), its exports and the registry's pyfunc model."""
