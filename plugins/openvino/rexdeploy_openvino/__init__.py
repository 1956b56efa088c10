"""rexdeploy builder plugin for openvino (placeholder until the plugin lands)."""
