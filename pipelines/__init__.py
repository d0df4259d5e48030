"""Kubeflow pipelines of digilut: ``training`` (data → folds → ensemble → boxes → score) and
``inference`` (new slides + a trained ensemble → boxes). Compiled YAML lives in ``compiled/``."""
