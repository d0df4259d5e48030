"""Kubeflow Pipelines components: thin ``@dsl.component`` wrappers over :mod:`digilut.steps`.

Each component imports ``digilut`` inside its body (the body runs on its own in a pod, or in a
subprocess under ``kfp.local``) and calls one step function, the one the CLI calls too.
``patches``: the data half of the training pipeline; ``training``: its model half; ``inference``:
the inference pipeline. Images come from :func:`digilut.container_images.image`, one place, with
an immutable tag.
"""
