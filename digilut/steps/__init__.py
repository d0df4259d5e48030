"""The pipeline's steps on folders: one module per step, one ``<step>_step`` function each, which
both the Kubeflow component and the CLI command call.

Each function takes input folders (KFP artifact paths), parameters and output folders, calls the
library and writes its outputs. The components in ``components/`` only adapt KFP artifacts to
these calls, ``digilut run`` runs the same components through ``kfp.local``, and the CLI calls the
same functions on local folders (``prepare`` chains the data steps), so a step behaves the same in
a pod, locally and in a test. Modules: ``ingest`` (``list_source_step``, ``ingest_step``),
``extract``, ``merge``, ``label``, ``split``, ``start_tracking``, ``train``, ``predict``
(``predict_step``, ``predict_all_step``), ``evaluate``, ``publish``, ``fetch_models``,
``submission`` (and its ``write_boxes``, what ``digilut boxes`` runs), ``prepare``; ``common``
holds what they share. The modules of the CPU image's steps never import torch.

Artifacts (folders)::

    annotations   boxes.csv (validated training boxes), ingest.json (listing, slides, batches, problems)
    extracted     one batch: parts/, thumbnails/, report.json, shards.json (the shard store)
    patches       all batches merged: manifest.parquet, report.json, shards.json
    thumbnails    <stem>.png + slides.json (level-0 size of every slide)
    labels        manifest.parquet (+ overlap, label)
    split         manifest.parquet (+ split, fold, sampled), split.json
    model         one fold: model.pt, oof.parquet, result.json, tensorboard/ (digilut.train)
    predictions   predictions.parquet: the test patches with the ensemble's ``prob``
    results       boxes.csv, metrics.json, report.html, report.md, pictures/, geojson/, roc.png

Shards are not artifacts: the KFP launcher downloads every input artifact whole into the pod, and
the shards are the dataset (tens of GB on DigiLut). ``extract`` puts each slide's shard in the
*shard store* under a content-addressed name (``shards_uri``; by default ``<data_uri>/digilut-shards``,
see :func:`shard_store_for`), and the artifacts carry only the manifest and ``shards.json`` naming
the store. ``train_fold`` and ``predict`` read the patches they need by ranged GET
(:class:`digilut.shards.ShardReader`); ``merge``, ``label`` and ``split`` never touch a shard.
"""
