"""Local-run and deploy code, above the core library: the kfp.local runner, the demo, the local
S3/MLflow services, compiling and submitting to Kubeflow, Kubernetes names and run profiles.

Nothing in the core library (``digilut.*`` outside ``ops``, ``commands`` and ``cli``) imports this
package; ``tests/unit/test_layers.py`` holds that contract.
"""
