"""What tip keeps on disk: stage directories, their files and where they may be written.

The names of every file a stage writes (``layout``), stage directories read and written
shard by shard (``stagedir``), atomic writes and checksums (``files``), and where a stage
may write and what ``--overwrite`` may delete (``outputs``)."""
