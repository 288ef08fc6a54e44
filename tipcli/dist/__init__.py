"""Several processes: shards shared out, the device mesh, FSDP2.

Who does which shard and waiting for each other (``processes``), FSDP2's device mesh and
loading a model sharded on the meta device (``mesh``), and the student sharded for
training (``fsdp``)."""
