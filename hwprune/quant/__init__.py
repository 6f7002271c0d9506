"""INT8 quantization as a per-layer choice: calibrate, quantize (ORT QDQ or dynamic), check outputs, evaluate through
ONNX Runtime, and whether a device profile makes INT8 worth searching."""

from hwprune.quant.base import FP32, INT8, CalibrationRecord, QuantizationError, QuantizedModel, precision_label
from hwprune.quant.calibration import CalibrationSet, FeedReader, calibration_set, to_feeds
from hwprune.quant.check import OutputCheck, check_outputs, compare_outputs
from hwprune.quant.evaluate import OrtModule, evaluate_onnx
from hwprune.quant.plan import PrecisionPlan, group_units, layer_units, module_of, plan_for, weighted_nodes
from hwprune.quant.quantize import quantize, read_precision

__all__ = ["FP32", "INT8", "CalibrationRecord", "CalibrationSet", "FeedReader", "OrtModule", "OutputCheck",
           "PrecisionPlan", "QuantizationError", "QuantizedModel", "calibration_set", "check_outputs",
           "compare_outputs", "evaluate_onnx", "group_units", "layer_units", "module_of", "plan_for",
           "precision_label", "quantize", "read_precision", "to_feeds", "weighted_nodes"]
