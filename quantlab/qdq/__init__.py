"""Q/DQ ONNX models: the rules each target (TensorRT, ONNX Runtime CPU) requires of them."""
