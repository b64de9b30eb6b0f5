"""Optional integrations with training frameworks; each sub-module imports its framework, so import it
explicitly (``from lyco.integrations.transformers import LycoTrainer``): ``import lyco`` never does."""
