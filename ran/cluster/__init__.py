"""A study's cells on a Ray cluster (``ran-cli study run NAME --cluster ADDRESS``).

Ray schedules, retries and places the cells; DVC stays the record of what was computed:
each cell runs as its own ``dvc repro`` stage on a worker, from a copy of the user's commit,
pushes its outputs to the DVC remote, and hands its ``dvc.lock`` entry back to the driver,
which writes it into the user's ``studies/dvc.lock``. So ``dvc pull`` brings the outputs,
``dvc repro`` then has nothing to do, and a cell whose inputs are unchanged is never run
twice. Checkpoints go to the remote's storage, so a retried cell resumes on another node.

- :mod:`ran.cluster.cells`: which cells, their DVC stages, done or not, lock entries.
- :mod:`ran.cluster.worker`: what a Ray task runs on a node.
- :mod:`ran.cluster.driver`: checks, submission, the journal and ``study status``.
"""
