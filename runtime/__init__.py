"""eetool on-device and edge-server runtime.

Needs only numpy and one inference backend (onnxruntime, ``ai_edge_litert`` or ``tflite_runtime``);
zstandard / lz4 / brotli and pillow are optional. Never imports torch, tensorflow or onnx, and runs on
Python 3.8+ (JetPack 5).
"""
__version__ = "0.2.0"
