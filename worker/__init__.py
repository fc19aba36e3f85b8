"""deepqueue worker: Celery tasks, batching, diffusers + DeepCache pipelines, storage."""
