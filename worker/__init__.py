"""deepqueue worker: the Celery app and its main process at the top level; ``delivery`` (messages
in, batches out, acknowledgements back), ``pipeline`` (a pool process generating a batch) and
``output`` (storing what it made)."""
