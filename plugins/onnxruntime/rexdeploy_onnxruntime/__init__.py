"""rexdeploy builder plugin for onnxruntime (placeholder until the plugin lands)."""
