"""Where results live: the versioned artifact store and the dataset shards in it."""
