"""The ``kpg`` command-line application: ``kpg train`` (run folders, logs, checkpoints, resume),
``kpg compare``, ``kpg games`` and ``kpg convert-checkpoint``. It builds on the library (the
optimizer, ``kpg.nn``, ``kpg.algos``, ``kpg.envs``); nothing in the library imports it."""
