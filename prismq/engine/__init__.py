"""The layer-streaming engine: models run one decoder layer at a time from disk."""
