"""Graph passes: each file carries out one part of a Plan on an ONNX graph."""
