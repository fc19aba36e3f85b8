"""The pipeline side, in a pool process: a batch of jobs turned into images on the device."""
