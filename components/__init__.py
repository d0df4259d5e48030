"""Kubeflow Pipelines components: thin ``@dsl.component`` wrappers over :mod:`digilut.steps`.

Each component imports ``digilut`` inside its body (the body runs on its own in a pod, or in a
subprocess under ``kfp.local``) and calls one step function. Images come from
:func:`digilut.container_images.image`, one place, with an immutable tag.
"""
