"""Whether INT8 is worth searching on a device: its profile's ``[quantize]`` table, and what the backend can measure.

The profile also says how weights are quantized there (:func:`reduce_range`). The backend rule overrides the
profile: TVM's Relax ONNX importer (0.27) lowers QuantizeLinear/DequantizeLinear to
float arithmetic, so a QDQ file measured through TVM times FP32 work plus the (de)quantization around it, never INT8
kernels; such figures would be wrong, so INT8 is refused there. Estimates model no INT8 kernels either.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwprune.profiles import DeviceProfile, load_profile
from hwprune.quant.base import QuantizationError

TVM_REASON = ("TVM's Relax ONNX importer lowers QuantizeLinear/DequantizeLinear to float ops, so INT8 through TVM "
              "would time FP32 work plus conversions; measure INT8 with an ONNX Runtime backend (ort, ssh-ort)")
ESTIMATE_REASON = "the estimate backend models no INT8 kernels; INT8 latency must be measured"
_REFUSED = {"tvm": TVM_REASON, "tvm-rpc": TVM_REASON, "estimate": ESTIMATE_REASON}


@dataclass(frozen=True)
class Int8Policy:
    """``mode`` (search | measure | off) for this profile and backend, and the reason shown to the user."""

    mode: str
    reason: str

    @property
    def default_on(self) -> bool:
        """Whether a search quantizes by default (``--quantize`` unset) on this device."""
        return self.mode == "search"


def int8_policy(profile: DeviceProfile | str) -> Int8Policy:
    """The INT8 policy of ``profile`` as it measures now (its ``backend``, overrides included)."""
    prof = load_profile(profile)
    if prof.backend in _REFUSED:
        return Int8Policy("off", f"{prof.name} ({prof.backend}): {_REFUSED[prof.backend]}")
    return Int8Policy(prof.quantize.int8, prof.quantize.reason)


# x86 CPUs with these run ORT's u8 x s8 kernels with 32-bit accumulation (VPDPBUSD); without them (AVX2, AVX-512
# before VNNI) products are summed in pairs into 16 bits (VPMADDUBSW) and saturate on full-range weights, which ORT's
# quantization guide answers with reduce_range (7-bit weights). Measured here (AVX2 host): a CIFAR CNN's first conv
# alone in INT8 moved the outputs by 0.49 (relative), 0.011 with 7-bit weights.
_INT32_DOT = ("VNNI", "AMX")
_X86 = ("x86", "amd64", "intel", "amd ", "epyc", "xeon", "core i", "ryzen")


def reduce_range(profile: DeviceProfile | str) -> bool:
    """Whether INT8 weights are quantized to 7 bits on this device: ``[quantize] reduce_range`` of its profile, and
    for ``auto`` (the default), on for an x86 CPU whose description names no VNNI/AMX (detected profiles list the
    features: ``cpu = "detect"``), off for any other CPU (Arm has no such saturation)."""
    prof = load_profile(profile)
    mode = prof.quantize.reduce_range
    if mode != "auto":
        return mode == "on"
    cpu = prof.hardware.cpu.lower()
    return any(k in cpu for k in _X86) and not any(k.lower() in cpu for k in _INT32_DOT)


def require_int8(profile: DeviceProfile | str) -> Int8Policy:
    """The policy when INT8 was asked for explicitly (``--quantize int8``): allowed unless ``off``.

    Raises:
        QuantizationError: INT8 is off for this device or backend, with the reason.
    """
    policy = int8_policy(profile)
    if policy.mode == "off":
        raise QuantizationError(f"INT8 is off for this device: {policy.reason or 'its profile says so'}")
    return policy
