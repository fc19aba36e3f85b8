"""The output side: what a batch generated, encoded and stored once, with its sidecar and
manifest row (through ``producer.storage``)."""
