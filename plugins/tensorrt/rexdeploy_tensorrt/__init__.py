"""rexdeploy builder plugin for tensorrt (placeholder until the plugin lands)."""
