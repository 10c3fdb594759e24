"""Export of a device's personalised model to ExecuTorch and ONNX (issue 4)."""
