"""Engine builders: the Builder protocol, the plugin registry and timing statistics."""
