"""The Ray layer of dsnet: each DS-Net stage as a Ray Train job, chained into a pipeline.

Modules:

* :mod:`pipelines.config`: ``RayConfig`` and the pipeline YAML (three stages + ``ray:``).
* :mod:`pipelines.command`: what every command shares: usage errors, exit codes,
  ``--set``, SIGINT/SIGTERM, failure reports, the resume hint.
* :mod:`pipelines.cli`: the pipeline commands' plan, input checks and summary.
* :mod:`pipelines.runtime`: start or attach to Ray, check that the cluster can hold a stage.
* :mod:`pipelines.storage`: run folders on a local disk or any URI pyarrow opens.
* :mod:`pipelines.stage`: one stage as a Ray task that fits a ``TorchTrainer``, and the
  supernet -> reset_bn -> gate sequence with its run folder.
* :mod:`pipelines.run_record`: ``run.json``, the run folder's atomic ledger.
* :mod:`pipelines.faults`: fault injection for the restart and resume tests.
* :mod:`pipelines.sweep_config`, :mod:`pipelines.sweep_plan`, :mod:`pipelines.sweep`,
  :mod:`pipelines.sweep_results`: the Ray Tune sweep (YAML, plan, trials, Pareto fronts).
* :mod:`pipelines.full`, :mod:`pipelines.supernet`, :mod:`pipelines.reset_bn`,
  :mod:`pipelines.gate`, :mod:`pipelines.sweep`, :mod:`pipelines.predict`: command-line
  entry points (``python -m pipelines.full ...``).

In-process fast path: ``--num-workers 0`` (``ray.num_workers: 0``) runs every stage in the
driver process without Ray at all (no ``ray.init``, no ``TorchTrainer``, no 10-20 s worker
start-up), writing ``<run>/<stage>/local/checkpoint.pt``. Use it to debug a config or the
library. Torch then uses all cores' threads; on a busy shared machine
``OMP_NUM_THREADS=1`` can be many times faster (Ray workers get ``OMP_NUM_THREADS`` = their
CPUs).

Run folder ``<output>/<name>/``: ``run.json``; ``supernet/``, ``reset_bn/``, ``gate/`` (each
stage's Ray Train run, ``checkpoint_*/checkpoint.pt``); ``results/`` after the gate stage.
The same command again skips stages that are done (checkpoint SHA-256 intact) and resumes
an interrupted or failed stage from its latest checkpoint (Ray Train resumes a run whose
``RunConfig(storage_path, name)`` already holds checkpoints). Ctrl-C or SIGTERM cancels
the running stage and prints the command that resumes it. A run folder refuses a changed
stage config (use a new ``--name``).

On a cluster::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.full -c dsnet/configs/default.yml --output /shared/runs

Inside a job ``RAY_ADDRESS`` is set and the command attaches to the cluster (the driver
reserves no CPU). The upload of ``--working-dir`` skips what ``.gitignore`` and
``.rayignore`` list, and Ray 2.60 also skips ``.git`` and ``.venv`` by default. Give
``--output`` an absolute path that every node (and you) can reach: a relative one lands in
the job's temporary copy of the working folder. ``ray.health_check_interval_s`` (0.1 s)
reaches the stage's Train controller through the driver's environment, which Ray Train
hands on.
"""
