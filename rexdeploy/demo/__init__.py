"""The demo model: a small CNN trained on scikit-learn's digits, shipped as ONNX."""
