"""The names ``--engine`` and ``--precision`` accept, apart from the engines themselves so the
CLI can offer them without importing torch (building the parser stays fast)."""

#: ``auto`` calibrates (``core.inference.engine_choice``); the others run what they name.
ENGINE_CHOICES = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
#: Overrides every requested engine (like ``HISTO_WSSS_DEVICE`` for devices), so one setting
#: forces an engine for the CLI, the widgets and scripts at once.
ENGINE_ENV_VAR = "HISTO_WSSS_ENGINE"
#: The engines that run an exported model, by the Python module that provides them.
EXPORT_ENGINES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
