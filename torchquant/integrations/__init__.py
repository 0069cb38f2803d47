"""Integrations with other libraries' models and training loops; each submodule imports its library lazily."""
